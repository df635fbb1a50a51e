"""DETR3D geometry: box code, corners, projection and feature_sampling against hand-computed cases
and against the official functions (stored outputs, and the clone when present)."""
import math
import os
import pathlib
import runpy
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detr_tutorial.models import box_corners, denormalize_bbox, feature_sampling, normalize_bbox, project_points

DATA = pathlib.Path(__file__).parent / "data"
# A clone (bare is fine) of WangYueFt/detr3d; the live parity tests read the official functions from it
# and skip when it is absent. DATA/make_detr3d_reference.py stored their outputs on fixed inputs.
DETR3D_REPO = pathlib.Path(os.environ.get("DETR3D_REPO", "/work/.mirror/WangYueFt+detr3d/repo"))


MAKER = types.SimpleNamespace(**runpy.run_path(str(DATA / "make_detr3d_reference.py")))  # its cases and runner


@pytest.fixture(scope="module")
def reference():
    return torch.load(DATA / "detr3d_reference.pt", weights_only=False)


def check_sampling(got, expected):
    for key, g, e in zip(("ref3d", "sampled", "mask"), got, (expected["ref3d"], expected["sampled"], expected["mask"])):
        assert g.shape == e.shape and g.dtype == e.dtype, key
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5 if g.dtype == torch.float32 else 1e-12, msg=key)


# ----------------------------------------------------------------------------- official outputs

def test_reference_records_its_source(reference):
    assert reference["commit"] == "34a47673011fe13593a3e594a376668acca8bddb"
    assert set(reference["sampling"]) == {"rig", "rig_float64", "nuscenes"}


@pytest.mark.parametrize("case", ["rig", "rig_float64", "nuscenes"])
def test_feature_sampling_matches_stored_official_outputs(reference, case):
    stored = reference["sampling"][case]
    mask = stored["official"]["mask"]
    assert 0 < mask.float().mean() < 0.5  # the case holds visible and hidden (camera, query) pairs
    check_sampling(feature_sampling(**stored["inputs"]), stored["official"])


def test_box_code_matches_stored_official_outputs(reference):
    for case in reference["boxes"].values():
        torch.testing.assert_close(normalize_bbox(case["boxes"]), case["codes"], rtol=0, atol=0)
        torch.testing.assert_close(denormalize_bbox(case["codes"]), case["decoded"], rtol=0, atol=0)


def live_official():
    if not DETR3D_REPO.exists():
        pytest.skip(f"official detr3d repository not found at {DETR3D_REPO} (set DETR3D_REPO to a clone "
                    "to run the live parity tests; the stored outputs are checked without it)")
    return MAKER.official_functions(str(DETR3D_REPO))


@pytest.mark.filterwarnings("ignore:Default grid_sample")
def test_feature_sampling_matches_live_official_code():
    official = live_official()
    for case in MAKER.sampling_cases().values():
        check_sampling(feature_sampling(**case), MAKER.official_sampling(official, case))


def test_box_code_matches_live_official_code():
    official = live_official()
    for boxes in MAKER.box_cases().values():
        codes = official.normalize_bbox(boxes, None)
        torch.testing.assert_close(normalize_bbox(boxes), codes, rtol=0, atol=0)
        torch.testing.assert_close(denormalize_bbox(codes), official.denormalize_bbox(codes, None), rtol=0, atol=0)


# ----------------------------------------------------------------------------- hand-computed cases

# One camera at the ego origin looking along +x: camera (x, y, z) = (-y_ego, -z_ego, x_ego); focal 100 px,
# principal point (50, 40), image 80 x 100 (H x W). lidar2img row 0 = 100 * (0, -1, 0, 0) + 50 * (1, 0, 0, 0).
K = torch.tensor([[100.0, 0, 50, 0], [0, 100, 40, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
EGO2CAM = torch.tensor([[0.0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
LIDAR2IMG = K @ EGO2CAM
IMAGE = (80, 100)
PC_RANGE = (-20.0, -20.0, -8.0, 20.0, 20.0, 8.0)  # these points normalise to exact binary fractions
POINTS = {  # ego point: (u, v) in pixels, visible?
    "centre": ((10.0, 0.0, 0.0), (50.0, 40.0), True),
    "left_border": ((10.0, 5.0, 0.0), (0.0, 40.0), False),  # u = 0 exactly: the strict mask drops it
    "right_border": ((10.0, -5.0, 0.0), (100.0, 40.0), False),
    "top_border": ((10.0, 0.0, 4.0), (50.0, 0.0), False),
    "bottom_border": ((10.0, 0.0, -4.0), (50.0, 80.0), False),
    "just_inside": ((10.0, 4.5, 0.0), (5.0, 40.0), True),
    "outside": ((10.0, -6.0, 0.0), (110.0, 40.0), False),
    "behind": ((-10.0, 0.0, 0.0), None, False),
    "beside": ((0.0, 10.0, 0.0), None, False),  # depth 0: on the camera plane, not in front
}


def test_project_points_by_hand():
    pts = torch.tensor([p for p, _, _ in POINTS.values()])
    uv, depth = project_points(pts, LIDAR2IMG[None])
    assert uv.shape == (1, len(POINTS), 2) and depth.shape == (1, len(POINTS))
    torch.testing.assert_close(depth[0], pts[:, 0])  # depth = distance along the optical axis (ego x)
    for i, (name, (_, expected, _)) in enumerate(POINTS.items()):
        if expected is not None:
            torch.testing.assert_close(uv[0, i], torch.tensor(expected), msg=name)
    behind = list(POINTS).index("behind")
    # (u d, v d) = (50 x - 100 y, 40 x - 100 z) = (-500, -400), divided by max(depth, 1e-5) = 1e-5: far
    # off the image; dividing by the depth -10 instead would land at (50, 40), the image centre
    torch.testing.assert_close(uv[0, behind], torch.tensor([-5e7, -4e7]))
    torch.testing.assert_close(project_points(torch.tensor([[10.0, 2.0, 1.0]]), LIDAR2IMG[None])[0],
                               torch.tensor([[[30.0, 30.0]]]))


def test_feature_sampling_masks_and_values_by_hand():
    pts = torch.tensor([p for p, _, _ in POINTS.values()])
    lo, hi = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:])
    ref = ((pts - lo) / (hi - lo))[None]
    ramp = torch.arange(10.0).expand(1, 1, 1, 8, 10)  # one level, stride 10: value = feature column
    ref3d, sampled, mask = feature_sampling([ramp, 2 * ramp], ref, PC_RANGE, LIDAR2IMG[None, None], IMAGE)
    assert torch.equal(ref3d, ref) and ref3d.data_ptr() != ref.data_ptr()
    assert sampled.shape == (1, 1, len(POINTS), 1, 1, 2) and mask.shape == (1, 1, len(POINTS), 1, 1, 1)
    assert mask.flatten().tolist() == [v for _, _, v in POINTS.values()]
    for i, (name, (_, uv, visible)) in enumerate(POINTS.items()):
        if visible:  # align_corners=False: image u maps to feature column u / W * 10 - 0.5
            column = uv[0] / IMAGE[1] * 10 - 0.5
            torch.testing.assert_close(sampled[0, 0, i, 0, 0], torch.tensor([column, 2 * column]), msg=name)


def test_box_corners_by_hand():
    box = torch.tensor([[1.0, 2.0, 1.0, 2.0, 4.0, 2.0, math.pi / 2]])  # w 2, l 4, h 2, heading +y
    corners = box_corners(box)[0]
    # corner 0 = front (+l/2), left (+w/2), top (+h/2): local (2, 1, 1), turned 90 degrees -> (-1, 2, 1)
    torch.testing.assert_close(corners[0], torch.tensor([0.0, 4.0, 2.0]))
    torch.testing.assert_close(corners[7], torch.tensor([2.0, 0.0, 0.0]))  # back right bottom
    torch.testing.assert_close(corners.mean(0), box[0, :3])
    edges = (corners[[0, 0, 0]] - corners[[4, 2, 1]]).norm(dim=-1)  # along length, width, height
    torch.testing.assert_close(edges, torch.tensor([4.0, 2.0, 2.0]))


def test_feature_sampling_gradients():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 1, 2, 8, 10, generator=g, dtype=torch.float64, requires_grad=True)
    # inside the image and off pixel centres (bilinear interpolation has kinks there)
    pts = torch.tensor([[10.0, 2.1, 1.3], [12.0, -3.3, -0.7]], dtype=torch.float64)
    lo, hi = torch.tensor(PC_RANGE[:3], dtype=torch.float64), torch.tensor(PC_RANGE[3:], dtype=torch.float64)
    ref = ((pts - lo) / (hi - lo))[None].requires_grad_()
    lidar2img = LIDAR2IMG.double()[None, None]

    def sampled(f, r):
        return feature_sampling([f], r, PC_RANGE, lidar2img, IMAGE)[1]

    assert torch.autograd.gradcheck(sampled, (feat, ref))


@given(st.lists(st.floats(-math.pi + 1e-3, math.pi), min_size=1, max_size=8),
       st.floats(0.1, 20), st.booleans())
def test_box_code_round_trip(yaws, size, velocity):
    n = len(yaws)
    g = torch.Generator().manual_seed(n)
    boxes = torch.cat([torch.randn(n, 3, generator=g, dtype=torch.float64) * 10,
                       torch.full((n, 3), size, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]),
                       torch.tensor(yaws, dtype=torch.float64)[:, None]]
                      + ([torch.randn(n, 2, generator=g, dtype=torch.float64)] if velocity else []), 1)
    codes = normalize_bbox(boxes)
    assert codes.shape == (n, 10 if velocity else 8)
    torch.testing.assert_close(codes[:, [2, 3, 5]], boxes[:, 3:6].log())
    torch.testing.assert_close(codes[:, 6:8].norm(dim=-1), torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(denormalize_bbox(codes), boxes)


# ----------------------------------------------------------------------------- bad input

def good_inputs():
    return dict(mlvl_feats=[torch.zeros(1, 2, 4, 8, 10)], reference_points=torch.full((1, 3, 3), 0.5),
                pc_range=PC_RANGE, lidar2img=LIDAR2IMG.expand(1, 2, 4, 4).clone(), image_size=IMAGE)


def singular(x):
    x["lidar2img"][0, 1, 2] = 0  # the depth row: no longer a camera
    return x


def set_(key, value):
    def mutate(x):
        x[key] = value(x) if callable(value) else value
        return x
    return mutate


@pytest.mark.parametrize("mutate, error, match", [
    (singular, ValueError, r"lidar2img must hold invertible.*\[\[0, 1\]\]"),
    (set_("lidar2img", lambda x: x["lidar2img"][..., :3, :]), ValueError,
     r"lidar2img must have shape \(\.\.\., 4, 4\)"),
    (set_("lidar2img", lambda x: x["lidar2img"][:, :1]), ValueError, r"lidar2img must have shape \(B=1, N=2"),
    (set_("lidar2img", lambda x: x["lidar2img"] * float("nan")), ValueError, "lidar2img holds NaN"),
    (set_("reference_points", torch.full((1, 3, 3), 1.1)), ValueError, r"reference_points must be normalised"),
    (set_("reference_points", torch.full((1, 3, 3), -0.1)), ValueError, r"reference_points must be normalised"),
    (set_("reference_points", torch.full((1, 3, 2), 0.5)), ValueError, r"reference_points must have shape"),
    (set_("reference_points", torch.full((1, 3, 3), float("nan"))), ValueError, "reference_points holds NaN"),
    (set_("reference_points", torch.ones(1, 3, 3, dtype=torch.long)), TypeError, "reference_points must be a floating"),
    (set_("mlvl_feats", torch.zeros(1, 2, 4, 8, 10)), TypeError, "mlvl_feats must be a non-empty list"),
    (set_("mlvl_feats", lambda x: x["mlvl_feats"] + [torch.zeros(1, 2, 5, 4, 5)]), ValueError, r"mlvl_feats\[1\]"),
    (set_("pc_range", PC_RANGE[:5]), ValueError, "pc_range must be 6 numbers"),
    (set_("pc_range", (20.0, -20.0, -8.0, -20.0, 20.0, 8.0)), ValueError, "with max > min"),
    (set_("image_size", (0, 100)), ValueError, "image_size must be"),
])
def test_feature_sampling_rejects_bad_input(mutate, error, match):
    with pytest.raises(error, match=match):
        feature_sampling(**mutate(good_inputs()))


def test_box_functions_reject_bad_input():
    boxes = torch.tensor([[1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 0.3]])
    with pytest.raises(ValueError, match="boxes holds NaN"):
        normalize_bbox(torch.where(torch.arange(7) == 4, float("nan"), boxes))
    with pytest.raises(ValueError, match="positive sizes"):
        normalize_bbox(boxes * torch.tensor([1, 1, 1, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"last dimension in \(7, 9\)"):
        normalize_bbox(boxes[:, :6])
    with pytest.raises(ValueError, match="codes holds NaN"):
        denormalize_bbox(torch.full((1, 8), float("nan")))
    with pytest.raises(ValueError, match=r"last dimension in \(8, 10\)"):
        denormalize_bbox(boxes)
    with pytest.raises(ValueError, match="boxes holds NaN"):
        box_corners(boxes * float("nan"))
    with pytest.raises(ValueError, match=r"points must have shape \(\.\.\., P, 3\)"):
        project_points(torch.zeros(4, 2), LIDAR2IMG[None])
    with pytest.raises(TypeError, match="lidar2img must be a torch.Tensor"):
        project_points(torch.zeros(4, 3), LIDAR2IMG.numpy())
