"""The procedural multi-camera world: determinism, geometry of the rig, statistics of the scenes."""
import math

import numpy as np
import pytest
import torch

from detr_tutorial.data import CameraRig, MultiViewDataset, multiview_collate
from detr_tutorial.data.multiview import CLASS_SIZES
from detr_tutorial.data.raster import NEAR, Camera, fill_polygon
from detr_tutorial.models import box_corners, project_points


@pytest.fixture(scope="module")
def scenes():
    data = MultiViewDataset(60, seed=3)
    return data, [data[i] for i in range(len(data))]


def test_items_shapes_and_types(scenes):
    data, items = scenes
    images, lidar2img, target = items[0]
    n = len(target["labels"])
    assert images.shape == (6, 3, 64, 112) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert lidar2img.shape == (6, 4, 4) and lidar2img.dtype == torch.float32
    assert target["boxes"].shape == (n, 7) and target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64 and target["visible_pixels"].shape == (n, 6)
    batch = multiview_collate(items[:3])
    assert batch[0].shape == (3, 6, 3, 64, 112) and batch[1].shape == (3, 6, 4, 4) and len(batch[2]) == 3


def test_deterministic_by_seed_and_index(scenes):
    data, items = scenes
    again = MultiViewDataset(60, seed=3)
    for i in (7, 2):  # any order gives the same scene
        for a, b in zip(again[i][:2], items[i][:2]):
            assert torch.equal(a, b)
        for key in items[i][2]:
            assert torch.equal(again[i][2][key], items[i][2][key])
    other = MultiViewDataset(60, seed=4)[2]
    assert not torch.equal(other[0], items[2][0])


def test_lidar2img_is_intrinsics_times_ego2cam():
    rig = CameraRig(num_cams=4, image_size=(40, 60), overlap_deg=10)
    pad = torch.eye(4).repeat(4, 1, 1)
    pad[:, :3, :3] = rig.intrinsics
    torch.testing.assert_close(rig.lidar2img, pad @ torch.linalg.inv(rig.cam2ego))
    # camera 0 looks forward: a point straight ahead at its height lands in the middle column
    ahead = torch.tensor([[30.0, 0.0, 1.6]])
    uv, depth = project_points(ahead, rig.lidar2img)
    assert depth[0, 0] == pytest.approx(29.0 * math.cos(math.radians(5)), rel=1e-4)  # pitched down 5 degrees
    assert uv[0, 0, 0] == pytest.approx(30.0, abs=1e-3)
    assert (depth[1:, 0] < 30).all() and depth[2, 0] < 0  # the rear camera sees it behind
    uv, _ = project_points(torch.tensor([[30.0, 5.0, 1.6], [30.0, 0.0, 0.0], [30.0, 0.0, 3.0]]), rig.lidar2img[:1])
    left, low, high = uv[0]
    assert left[0] < 30 and low[1] > high[1]  # left of the axis -> left half; v grows downwards
    sky, ground = rig.backgrounds[0][0].mean(0), rig.backgrounds[0][-1].mean(0)
    assert sky[2] > sky[0] + 0.1 and abs(ground[2] - ground[0]) < 0.05  # blue on top, grey below


def visible_cameras(rig, points):
    uv, depth = project_points(points, rig.lidar2img)
    h, w = rig.image_size
    return (depth > 1e-5) & (uv[..., 0] > 0) & (uv[..., 0] < w) & (uv[..., 1] > 0) & (uv[..., 1] < h)


def test_ring_covers_every_direction_and_neighbours_overlap():
    rig = CameraRig()
    azimuth = torch.linspace(-math.pi, math.pi, 361)
    points = torch.stack([20 * azimuth.cos(), 20 * azimuth.sin(), torch.ones_like(azimuth)], -1)
    seen = visible_cameras(rig, points)  # (6, 361)
    assert seen.any(0).all()
    seams = torch.tensor([[20 * math.cos(a), 20 * math.sin(a), 1.0]
                          for a in (math.pi / 6 + k * math.pi / 3 for k in range(6))])
    assert (visible_cameras(rig, seams).sum(0) == 2).all()  # the seam between each pair shows in both


def test_scene_statistics(scenes):
    data, items = scenes
    boxes = torch.cat([t["boxes"] for _, _, t in items])
    labels = torch.cat([t["labels"] for _, _, t in items])
    cams = (torch.cat([t["visible_pixels"] for _, _, t in items]) > 0).sum(1)
    distance = boxes[:, :2].norm(dim=-1)
    assert 3.0 <= distance.min() and distance.max() <= 40.0
    assert torch.bincount(labels, minlength=3).min() >= 20
    for c in range(3):  # class-typical sizes within the jitter, centres at half height on the ground
        size = boxes[labels == c, 3:6].double()
        assert ((size / torch.from_numpy(CLASS_SIZES[c]) - 1).abs() <= data.size_jitter + 1e-6).all()
    torch.testing.assert_close(boxes[:, 2], boxes[:, 5] / 2)
    assert boxes[:, 6].min() < -2.5 and boxes[:, 6].max() > 2.5
    assert (cams == 0).any() and (cams >= 2).sum() > 0.1 * len(cams)  # hidden ones and ones on a seam


def test_footprints_do_not_overlap(scenes):
    for _, _, target in scenes[1]:
        b = target["boxes"]
        radius = b[:, 3:5].norm(dim=-1) / 2
        gap = torch.cdist(b[:, :2], b[:, :2]) - radius[:, None] - radius[None, :]
        assert (gap + torch.eye(len(b)) * 1e3 > 0).all()


def test_visible_objects_project_into_their_cameras(scenes):
    data, items = scenes
    h, w = data.rig.image_size
    for _, lidar2img, target in items[:20]:
        n = len(target["boxes"])
        uv, depth = project_points(box_corners(target["boxes"]).flatten(0, 1), lidar2img)  # (6, n * 8, ...)
        uv, depth = uv.view(6, n, 8, 2), depth.view(6, n, 8)
        in_front = depth > NEAR
        uv = uv.clamp(-1e4, 1e4)
        overlaps = (in_front.any(-1) & (uv[..., 0].max(-1).values > 0) & (uv[..., 0].min(-1).values < w)
                    & (uv[..., 1].max(-1).values > 0) & (uv[..., 1].min(-1).values < h))  # (6, n)
        assert (overlaps.T | (target["visible_pixels"] == 0)).all()


def test_near_boxes_hide_far_ones():
    data = MultiViewDataset(1)
    # a truck broadside 10 m ahead (its ends reach cameras 1 and 5) and a pedestrian 6 m behind it
    boxes = np.array([[10.0, 0, 1.6, 2.5, 8.0, 3.2, math.pi / 2], [16.0, 0, 0.9, 0.7, 0.7, 1.8, 0]])
    images, visible = data.render_boxes(boxes, [1, 2])
    assert visible[0, 0] > 100 and visible[1].sum() == 0
    _, alone = data.render_boxes(boxes[1:], [2])
    assert alone[0, 0] > 0  # without the truck the pedestrian shows
    assert not np.allclose(images[0], data.rig.backgrounds[0])
    assert np.allclose(images[3], data.rig.backgrounds[3], atol=1e-6)  # the rear camera sees neither


def test_fill_polygon_uses_pixel_centres():
    image, ids = np.zeros((5, 6, 3)), np.full((5, 6), -1)
    fill_polygon(image, ids, np.array([[1.0, 1.0], [3.0, 1.0], [3.0, 3.0], [1.0, 3.0]]), np.ones(3), 4)
    assert (ids == 4).sum() == 4 and (ids[1:3, 1:3] == 4).all()  # centres 1.5 and 2.5 inside, 0.5 and 3.5 not
    assert image[..., 0].sum() == 4


def test_polygon_clipped_at_the_near_plane():
    cam = Camera(np.array([[10.0, 0, 5], [0, 10, 5], [0, 0, 1]]), np.eye(4), (10, 10))
    # a square from depth -1 to 3 (camera frame = ego frame here): the part behind NEAR is cut off
    poly = cam.project_polygon(np.array([[-1.0, 1, -1], [1, 1, -1], [1, 1, 3], [-1, 1, 3]]))
    assert len(poly) == 4 and np.isfinite(poly).all()
    assert poly[:, 1].max() == pytest.approx(5 + 10 / NEAR)
    assert len(cam.project_polygon(np.array([[0.0, 0, -1], [1, 0, -1], [1, 1, -2]]))) == 0


def test_camera_culls_only_what_it_cannot_see():
    cam = Camera(np.array([[10.0, 0, 5], [0, 10, 5], [0, 0, 1]]), np.eye(4), (10, 10))
    cube = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    assert cam.may_see(cube + [0, 0, 5]) and cam.may_see(cube)  # ahead; straddling the camera plane
    assert not cam.may_see(cube + [0, 0, -5])  # behind
    assert not cam.may_see(cube + [-20, 0, 5]) and not cam.may_see(cube + [0, 20, 5])  # beside, below


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_scenes=-1), "num_scenes"),
    (dict(min_objects=3, max_objects=2), "min_objects"),
    (dict(distance=(5.0, 3.0)), "distance"),
    (dict(size_jitter=0.7), "size_jitter"),
])
def test_dataset_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiViewDataset(**kwargs)


def test_rig_rejects_bad_arguments_and_index_out_of_range():
    with pytest.raises(ValueError, match="num_cams"):
        CameraRig(num_cams=3)
    with pytest.raises(ValueError, match="overlap_deg"):
        CameraRig(overlap_deg=0)
    with pytest.raises(IndexError, match="out of range"):
        MultiViewDataset(5)[5]
