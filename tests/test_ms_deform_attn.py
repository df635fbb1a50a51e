"""Multi-scale deformable attention: the core op and the MSDeformAttn module."""
import math
import os
import pathlib
import subprocess
import types
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detr_tutorial.models import MSDeformAttn
from detr_tutorial.models.deformable_attention import initial_sampling_offsets
from detr_tutorial.ops import (level_start_index, multi_scale_deformable_attention,
                               multi_scale_deformable_attention_grid_sample)

VECTORS = pathlib.Path(__file__).parent / "data" / "official_vectors.pt"
# A git clone (bare is fine) of fundamentalvision/Deformable-DETR; the parity tests read the official
# pure-PyTorch code from it at test time and skip when it is absent. Nothing of it is stored here.
OFFICIAL_REPO = pathlib.Path(os.environ.get("DEFORMABLE_DETR_REPO",
                                            "/work/.mirror/fundamentalvision+Deformable-DETR/repo"))


def official_source(path):
    """The text of ``path`` at HEAD of the official repository."""
    return subprocess.run(["git", "-C", str(OFFICIAL_REPO), "show", f"HEAD:{path}"],
                          check=True, capture_output=True, text=True).stdout


def official_module(name, src, **names):
    """Execute official source ``src`` as a fresh module holding ``names`` (its stripped imports)."""
    mod = types.ModuleType(name)
    mod.__dict__.update(names)
    with warnings.catch_warnings():  # their docstrings hold invalid escape sequences
        warnings.simplefilter("ignore")
        exec(compile(src, name, "exec"), mod.__dict__)
    return mod


def random_case(seed, n=2, m=3, d=4, lq=5, p=3, shapes=((6, 5), (3, 4), (1, 2)),
                dtype=torch.float64, spread=0.3):
    """Inputs with locations in [-spread, 1 + spread], so some points fall off the map."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * (1 + 2 * spread) - spread
    attn = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=dtype)
    return value, shapes, loc, attn


def naive(value, shapes, loc, attn):
    """Per-point Python loop: bilinear interpolation of the 4 pixels around each point."""
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = loc.shape
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    start = level_start_index(shapes).tolist()
    for b in range(n):
        for q in range(lq):
            for h in range(m):
                for lvl in range(levels):
                    hh, ww = shapes[lvl].tolist()
                    for pt in range(points):
                        x = loc[b, q, h, lvl, pt, 0].item() * ww - 0.5
                        y = loc[b, q, h, lvl, pt, 1].item() * hh - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < ww and 0 <= yi < hh:
                                w = (1 - abs(x - xi)) * (1 - abs(y - yi)) * attn[b, q, h, lvl, pt]
                                out[b, q, h] += w * value[b, start[lvl] + yi * ww + xi, h]
    return out.flatten(2)


# ----------------------------------------------------------------------------- core op

@pytest.mark.parametrize("case", range(3))
def test_official_reference_vectors(case):
    c = torch.load(VECTORS, weights_only=False)["ms_deform_attn_core"][case]
    args = c["value"], c["spatial_shapes"], c["sampling_locations"], c["attention_weights"]
    assert (c["sampling_locations"] < 0).any() or (c["sampling_locations"] > 1).any()
    torch.testing.assert_close(multi_scale_deformable_attention(*args), c["output"], rtol=0, atol=1e-10)
    out32 = multi_scale_deformable_attention(*(a.float() if a.is_floating_point() else a for a in args))
    torch.testing.assert_close(out32, c["output"].float(), rtol=0, atol=1e-5)


def test_matches_naive_loop():
    args = random_case(0)
    torch.testing.assert_close(multi_scale_deformable_attention(*args), naive(*args),
                               rtol=0, atol=1e-12)


def test_level_start_index():
    shapes = torch.tensor([[4, 6], [2, 3], [1, 1]])
    assert level_start_index(shapes).tolist() == [0, 24, 30]


def test_points_off_the_map_read_zeros():
    value, shapes, loc, attn = random_case(1)
    far = loc.clone()
    far[..., 0] += torch.where(loc[..., 0] > 0.5, 3.0, -3.0)  # x in [-3.3, -2.5] or [3.5, 4.3]
    assert multi_scale_deformable_attention(value, shapes, far, attn).abs().max() == 0
    # half a pixel outside the border: two of the four corners are off the map, like grid_sample
    edge = loc.clone()
    edge[..., 0] = -0.25 / shapes[:, 1].to(loc.dtype)[:, None]  # x = -0.25 px from the left edge
    torch.testing.assert_close(multi_scale_deformable_attention(value, shapes, edge, attn),
                               multi_scale_deformable_attention_grid_sample(value, shapes, edge, attn))
    assert multi_scale_deformable_attention(value, shapes, edge, attn).abs().max() > 0


@given(n=st.integers(1, 2), m=st.integers(1, 3), d=st.integers(1, 5), lq=st.integers(1, 6),
       p=st.integers(1, 3), shapes=st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)),
                                           min_size=1, max_size=3), seed=st.integers(0, 10**6))
def test_matches_grid_sample_forward_and_gradients(n, m, d, lq, p, shapes, seed):
    value, shapes, loc, attn = random_case(seed, n, m, d, lq, p, shapes)
    grad = torch.randn(n, lq, m * d, dtype=value.dtype)
    results = []
    for fn in (multi_scale_deformable_attention, multi_scale_deformable_attention_grid_sample):
        inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = fn(inputs[0], shapes, inputs[1], inputs[2])
        out.backward(grad)
        results.append([out] + [t.grad for t in inputs])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_gradcheck():
    value, shapes, loc, attn = random_case(2, n=1, m=2, d=2, lq=3, p=2, shapes=((3, 4), (2, 2)))
    loc[0, 0, 0, :, 0] = torch.tensor([0.0, 1.0])  # on the left and bottom borders of the map
    loc[0, 1, 1, :, 1] = torch.tensor([1.0, 0.0])  # on the right and top borders
    assert ((loc < 0) | (loc > 1)).any()  # and some off the map
    # bilinear sampling has kinks at pixel centres (integer pixel coordinates): stay away from them
    pix = loc * shapes.flip(-1).to(loc.dtype)[:, None] - 0.5
    assert ((pix - pix.round()).abs() > 1e-3).all()
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(
        lambda v, sl, a: multi_scale_deformable_attention(v, shapes, sl, a), inputs)


def test_float32_close_to_float64():
    args = random_case(3)
    out64 = multi_scale_deformable_attention(*args)
    out32 = multi_scale_deformable_attention(*(a.float() if a.is_floating_point() else a for a in args))
    torch.testing.assert_close(out32, out64.float(), rtol=0, atol=1e-5)


NAN = float("nan")


@pytest.mark.parametrize("mutate, error, match", [
    (lambda v, s, sl, a: (v, torch.tensor([[6, 5], [3, 4], [2, 2]]), sl, a), ValueError, "sum to"),
    (lambda v, s, sl, a: (v[:, :-1], s, sl, a), ValueError, "value has S = 43"),
    (lambda v, s, sl, a: (v, s, sl[..., :1], a), ValueError, r"\(x, y\)"),
    (lambda v, s, sl, a: (v, s, sl, a[..., :-1]), ValueError, "attention_weights must have shape"),
    (lambda v, s, sl, a: (v, s.float(), sl, a), ValueError, "spatial_shapes must be an integer"),
    (lambda v, s, sl, a: (v, s.flatten(), sl, a), ValueError, r"spatial_shapes .* shape \(L, 2\)"),
    (lambda v, s, sl, a: (v, s[:2], sl, a), ValueError, "levels"),
    (lambda v, s, sl, a: (v[:, :0], s[:0], sl[:, :, :, :0], a[:, :, :, :0]), ValueError, "at least one level"),
    (lambda v, s, sl, a: (v, s * torch.tensor([1, 0]), sl, a), ValueError, "spatial_shapes must be positive"),
    (lambda v, s, sl, a: (v, s, sl[..., :0, :], a[..., :0]), ValueError, "at least one point"),
    (lambda v, s, sl, a: (v[0], s, sl, a), ValueError, r"value must have shape \(N, S, M, D\)"),
    (lambda v, s, sl, a: (v[:1], s, sl, a), ValueError, "do not match value's"),
    (lambda v, s, sl, a: (v.long(), s, sl, a), TypeError, "value must be a floating-point"),
    (lambda v, s, sl, a: (v, s, sl.long(), a), TypeError, "sampling_locations must be a floating-point"),
    (lambda v, s, sl, a: (v, s, sl, a > 0.5), TypeError, "attention_weights must be a floating-point"),
    (lambda v, s, sl, a: (v, s.tolist(), sl, a), TypeError, "spatial_shapes must be a torch.Tensor"),
    (lambda v, s, sl, a: (v, s, sl.index_fill(0, torch.tensor([0]), NAN), a), ValueError,
     "sampling_locations must be finite"),
    (lambda v, s, sl, a: (v, s, sl, a.index_fill(0, torch.tensor([1]), NAN)), ValueError,
     "attention_weights must be finite"),
    (lambda v, s, sl, a: (v.index_fill(1, torch.tensor([3]), float("inf")), s, sl, a), ValueError,
     "value must be finite"),
])
@pytest.mark.parametrize("fn", [multi_scale_deformable_attention, multi_scale_deformable_attention_grid_sample])
def test_bad_inputs_raise(fn, mutate, error, match):
    with pytest.raises(error, match=match):
        fn(*mutate(*random_case(4)))


def test_level_start_index_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least one level"):
        level_start_index(torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        level_start_index(torch.tensor([[2.0, 3.0]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        level_start_index([[2, 3]])


def test_inf_in_value_raises():
    """Why value is checked: off-map corners read some row with weight 0, and 0 · inf = NaN
    would reach queries that never sample that row."""
    value, shapes, loc, attn = random_case(5)
    value[:, 0] = float("inf")  # the row every off-map corner of batch 0 is clamped to
    with pytest.raises(ValueError, match="value must be finite"):
        multi_scale_deformable_attention(value, shapes, loc, attn)


@pytest.mark.parametrize("n, lq", [(0, 5), (2, 0)])
def test_empty_batch_or_queries(n, lq):
    value, shapes, loc, attn = random_case(6, n=2, lq=5)
    value, loc, attn = (t[:n].clone().requires_grad_() for t in (value, loc[:, :lq], attn[:, :lq]))
    for fn in (multi_scale_deformable_attention, multi_scale_deformable_attention_grid_sample):
        out = fn(value, shapes, loc, attn)
        assert out.shape == (n, lq, 3 * 4)
        out.sum().backward()
        assert value.grad.shape == value.shape and value.grad.abs().sum() == 0
        value.grad = None


# ----------------------------------------------------------------------------- module

def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="divide"):
        MSDeformAttn(d_model=30, n_heads=8)


def test_official_initialisation():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=64, n_levels=3, n_heads=8, n_points=4)
    assert attn.sampling_offsets.weight.abs().max() == 0
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    # head h looks along angle 2πh/8, pushed onto the unit square; point i is i + 1 times as far
    expected_dirs = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                                 dtype=torch.float32)
    for i in range(4):
        torch.testing.assert_close(bias[:, 1, i], expected_dirs * (i + 1))  # float32 cos/sin
    torch.testing.assert_close(bias, initial_sampling_offsets(8, 3, 4).view(8, 3, 4, 2))
    assert attn.attention_weights.weight.abs().max() == 0 and attn.attention_weights.bias.abs().max() == 0
    for lin in (attn.value_proj, attn.output_proj):
        bound = math.sqrt(6 / (lin.in_features + lin.out_features))  # xavier_uniform
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
        assert lin.bias.abs().max() == 0
    # attention starts uniform over levels × points, whatever the query
    query = torch.randn(2, 5, 64)
    _, weights = attn.sampling(query, torch.rand(2, 5, 3, 2), torch.tensor([[4, 4], [2, 2], [1, 1]]))
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 12))


def flat_inputs(n=2, c=32, shapes=((6, 8), (3, 4)), lq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    return (torch.randn(n, lq, c, generator=g), torch.rand(n, lq, len(shapes), 2, generator=g),
            torch.randn(n, s, c, generator=g), shapes, level_start_index(shapes))


def test_sampling_locations_from_points_and_boxes():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    torch.nn.init.normal_(attn.sampling_offsets.weight)
    query, ref, _, shapes, _ = flat_inputs()
    offsets = attn.sampling_offsets(query).view(2, 7, 4, 2, 2, 2)
    loc, _ = attn.sampling(query, ref, shapes)
    wh = torch.tensor([[8.0, 6.0], [4.0, 3.0]])  # (W, H) of each level
    torch.testing.assert_close(loc, ref[:, :, None, :, None] + offsets / wh[:, None])
    boxes = torch.cat([ref, torch.rand(2, 7, 2, 2)], -1)
    loc, _ = attn.sampling(query, boxes, shapes)
    torch.testing.assert_close(loc, boxes[:, :, None, :, None, :2]
                               + offsets / 2 * boxes[:, :, None, :, None, 2:] * 0.5)


def test_padding_mask_zeroes_padded_values():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    query, ref, src, shapes, start = flat_inputs()
    mask = torch.zeros(2, src.shape[1], dtype=torch.bool)
    mask[1, 30:48] = True
    changed = src.clone()
    changed[mask] = torch.randn(int(mask.sum()), 32) * 100
    out = attn(query, ref, src, shapes, start, mask)
    torch.testing.assert_close(attn(query, ref, changed, shapes, start, mask), out)
    assert not torch.allclose(attn(query, ref, changed, shapes, start), attn(query, ref, src, shapes, start))
    # a masked position reads exactly as a zero value (bias included) would
    value = attn.value_proj(src).masked_fill(mask[..., None], 0.0).view(2, -1, 4, 8)
    loc, w = attn.sampling(query, ref, shapes)
    torch.testing.assert_close(out, attn.output_proj(multi_scale_deformable_attention(value, shapes, loc, w)))


def test_module_shapes_gradients_and_errors():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    query, ref, src, shapes, start = flat_inputs()
    out = attn(query, ref, src, shapes, start)
    assert out.shape == (2, 7, 32)
    out.square().sum().backward()
    for name, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="2 \\(points\\) or 4"):
        attn(query, torch.rand(2, 7, 2, 3), src, shapes, start)
    with pytest.raises(ValueError, match="do not sum"):
        attn(query, ref, src[:, :-1], shapes, start)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda q, r, x, s, i, m: (q[0], r, x, s, i, m), ValueError, "query .* must be 3-d"),
    (lambda q, r, x, s, i, m: (q, r, x[0], s, i, m), ValueError, "input_flatten .* must be 3-d"),
    (lambda q, r, x, s, i, m: (q[:1], r[:1], x, s, i, m), ValueError, "query has batch 1"),
    (lambda q, r, x, s, i, m: (q[..., :16], r, x, s, i, m), ValueError, "32 channels"),
    (lambda q, r, x, s, i, m: (q, r[:, :, :1], x, s, i, m), ValueError, "reference_points must have shape"),
    (lambda q, r, x, s, i, m: (q, (r * 4).long(), x, s, i, m), TypeError, "reference_points must be a floating"),
    (lambda q, r, x, s, i, m: (q, r, x, s[:1], i, m), ValueError, r"input_spatial_shapes must have shape \(2, 2\)"),
    (lambda q, r, x, s, i, m: (q, r, x, s, i + 1, m), ValueError, r"input_level_start_index must be \[0, 48\]"),
    (lambda q, r, x, s, i, m: (q, r, x, s, i, m.float()), TypeError, "input_padding_mask must be a bool"),
    (lambda q, r, x, s, i, m: (q, r, x, s, i, m[:, 1:]), ValueError, "input_padding_mask must have shape"),
    (lambda q, r, x, s, i, m: (q.tolist(), r, x, s, i, m), TypeError, "query must be a torch.Tensor"),
    (lambda q, r, x, s, i, m: (q, r, x.index_fill(1, torch.tensor([2]), NAN), s, i, m), ValueError,
     "value must be finite"),
])
def test_module_bad_inputs_raise(mutate, error, match):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    query, ref, src, shapes, start = flat_inputs()
    mask = torch.zeros(2, src.shape[1], dtype=torch.bool)
    attn(query, ref, src, shapes, start, mask)  # the unmutated inputs are fine
    with pytest.raises(error, match=match):
        attn(*mutate(query, ref, src, shapes, start, mask))


# ----------------------------------------------------------------------------- half precision

BF16_STEP = 2.0 ** -8  # bfloat16 keeps 8 significant bits: neighbouring values differ by 2^-8 relative


def test_core_computes_half_precision_in_float32():
    """bfloat16 value and weights with float32 locations (what a bf16 model or autocast hands
    over): the sum runs in float32 on the given numbers, only the result is rounded."""
    value, shapes, loc, attn = random_case(7, dtype=torch.float32)
    attn = attn.softmax(-1)  # weights of a head sum to at most 1 (per level here), as in the model
    half = [value.bfloat16().requires_grad_(), loc.clone().requires_grad_(), attn.bfloat16().requires_grad_()]
    exact = [t.detach().float().requires_grad_() for t in half]
    grad = torch.randn(2, 5, 12)
    out = multi_scale_deformable_attention(half[0], shapes, half[1], half[2])
    ref = multi_scale_deformable_attention(exact[0], shapes, exact[1], exact[2])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    out.backward(grad.bfloat16())
    ref.backward(grad.bfloat16().float())
    for h, e in zip(half, exact):
        assert h.grad.dtype == h.dtype
        torch.testing.assert_close(h.grad, e.grad.to(h.dtype), rtol=0, atol=0)
    # against the unrounded float32 inputs: rounding value and weights costs at most half a step
    # each, relative to Σ|A·b·v| <= 3 levels · max|v|; rounding the result half a step of |out|
    bound = 3 * value.abs().max() * BF16_STEP * 1.5
    torch.testing.assert_close(out.float(), multi_scale_deformable_attention(value, shapes, loc, attn),
                               rtol=0, atol=bound)
    torch.testing.assert_close(multi_scale_deformable_attention_grid_sample(half[0], shapes, half[1], half[2]),
                               out, rtol=0, atol=float(out.detach().abs().max()) * BF16_STEP)


def test_core_ignores_autocast():
    """Under autocast the core sees its inputs as they are and computes in their dtype."""
    args = random_case(8, dtype=torch.float32)
    expected = multi_scale_deformable_attention(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multi_scale_deformable_attention(*args)
        out_gs = multi_scale_deformable_attention_grid_sample(*args)
    assert out.dtype == out_gs.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out_gs, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"with_box_refine": True}])
@pytest.mark.parametrize("mode", ["bfloat16 model", "autocast"])
def test_deformable_detr_in_bfloat16(mode, options):
    from test_deformable_detr import SMALL, images_and_mask  # imports this module: import late

    from detr_tutorial.models import build_deformable_detr
    torch.manual_seed(0)
    model = build_deformable_detr(**SMALL, **options).eval()
    images, mask = images_and_mask()
    with torch.no_grad():
        expected = model(images, mask)
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(images, mask)
        else:
            out = model.to(torch.bfloat16)(images.bfloat16(), mask)
    for key in ("pred_logits", "pred_boxes"):
        assert out[key].dtype == torch.bfloat16
        # each layer rounds its output to 8 bits; through backbone, encoder and 2 decoder layers the
        # roundings add up to about one step at the output's scale (measured: 1.2): allow 4
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(out[key].float(), expected[key], rtol=0, atol=4 * BF16_STEP * scale)


def test_two_stage_deformable_detr_runs_in_bfloat16():
    """Two-stage picks its queries by top-k over nearly tied encoder scores at initialisation:
    bfloat16 may pick others, so only finiteness and shapes are compared."""
    from test_deformable_detr import SMALL, images_and_mask

    from detr_tutorial.models import build_deformable_detr
    torch.manual_seed(0)
    model = build_deformable_detr(**SMALL, with_box_refine=True, two_stage=True).eval().to(torch.bfloat16)
    images, mask = images_and_mask()
    with torch.no_grad():
        out = model(images.bfloat16(), mask)
    assert out["pred_boxes"].shape == (2, 10, 4) and torch.isfinite(out["pred_boxes"]).all()
    assert torch.isfinite(out["pred_logits"]).all()


def load_official_module():
    """The official MSDeformAttn with its CUDA call swapped for the official pure-PyTorch
    core, loaded from the local mirror of fundamentalvision/Deformable-DETR (not stored here)."""
    if not OFFICIAL_REPO.exists():
        pytest.skip(f"official Deformable-DETR repository not found at {OFFICIAL_REPO} "
                    "(set DEFORMABLE_DETR_REPO to a clone to run the parity tests)")

    func_src = official_source("models/ops/functions/ms_deform_attn_func.py").replace(
        "import MultiScaleDeformableAttention as MSDA", "")
    core = official_module("official_msda_func", func_src).ms_deform_attn_core_pytorch

    class PurePyTorchFunction:
        @staticmethod
        def apply(value, shapes, start, loc, weights, step):
            return core(value, shapes, loc, weights)

    mod_src = official_source("models/ops/modules/ms_deform_attn.py").replace(
        "from ..functions import MSDeformAttnFunction", "")
    return official_module("official_msda_module", mod_src, MSDeformAttnFunction=PurePyTorchFunction).MSDeformAttn


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_parity_with_official_module(ref_dim):
    official_cls = load_official_module()
    torch.manual_seed(0)
    official = official_cls(d_model=32, n_levels=2, n_heads=4, n_points=3)
    torch.manual_seed(0)
    ours = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    for (k1, v1), (k2, v2) in zip(official.state_dict().items(), ours.state_dict().items()):
        assert k1 == k2
        torch.testing.assert_close(v1, v2)  # same init formulas, same random stream
    for param in official.parameters():  # move away from the init so offsets matter
        torch.nn.init.normal_(param, std=0.3)
    ours.load_state_dict(official.state_dict())
    query, ref, src, shapes, start = flat_inputs()
    if ref_dim == 4:
        ref = torch.cat([ref, torch.rand_like(ref)], -1)
    mask = torch.zeros(2, src.shape[1], dtype=torch.bool)
    mask[0, 40:] = True
    torch.testing.assert_close(ours(query, ref, src, shapes, start, mask),
                               official(query, ref, src, shapes, start, mask))
