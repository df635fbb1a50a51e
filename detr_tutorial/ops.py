"""Multi-scale deformable attention core (Deformable DETR, Zhu et al. 2021).

Every query reads, for each head, ``P`` points on each of ``L`` feature levels,
at fractional positions, by bilinear interpolation; the sampled vectors are
summed with attention weights. The official repository ships a CUDA kernel and
a pure-PyTorch reference that calls ``F.grid_sample`` once per level and stacks
the results (``N·M·D·Lq·L·P`` floats, several times over).

This module computes the same numbers differently: bilinear interpolation is a
weighted sum over the 4 pixels around each point, so the whole operation is a
weighted sum of rows of the flattened value tensor. We compute, for all levels
at once, the flat row index of each of the ``4·L·P`` corners of every
(query, head) and its weight ``attention × bilinear × inside-the-map``, and let
``F.embedding_bag(mode="sum", per_sample_weights=...)`` do the gather-and-sum
without ever materialising the gathered vectors. Corners outside the map get
weight 0, which is exactly ``grid_sample``'s ``padding_mode="zeros"``.

The backward is written by hand: the value gradient is the adjoint of sampling
(spread each query's gradient bilinearly back onto the 4 pixels), which
``grid_sample``'s own backward computes natively; the location and attention
gradients need one dot product <output gradient, value row> per corner, which
``embedding_bag``'s per-sample-weight backward computes without gathering rows.
Time and memory: ``benchmarks/bench_ms_deform_attn.py``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["multi_scale_deformable_attention", "multi_scale_deformable_attention_grid_sample",
           "level_start_index"]


def level_start_index(spatial_shapes: Tensor) -> Tensor:
    """Offset of each level in a flattened multi-scale map.

    Args:
        spatial_shapes: ``(L, 2)`` integer (H, W) of each level.

    Returns:
        ``(L,)`` long tensor ``[0, H0·W0, H0·W0 + H1·W1, ...]``.
    """
    _check_spatial_shapes(spatial_shapes)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]).long()


def _check_inputs(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> None:
    for name, t in (("value", value), ("spatial_shapes", spatial_shapes),
                    ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if name != "spatial_shapes" and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if value.dim() != 4:
        raise ValueError(f"value must have shape (N, S, M, D), got {tuple(value.shape)}")
    _check_spatial_shapes(spatial_shapes)
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must have shape (N, Lq, M, L, P, 2) with (x, y) last, "
                         f"got {tuple(sampling_locations.shape)}")
    n, s, m, _ = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    if (sampling_locations.shape[0], sampling_locations.shape[2]) != (n, m):
        raise ValueError(f"sampling_locations batch/heads {tuple(sampling_locations.shape[:3:2])} "
                         f"do not match value's (N, M) = {(n, m)}")
    if spatial_shapes.shape[0] != levels:
        raise ValueError(f"spatial_shapes has {spatial_shapes.shape[0]} levels but "
                         f"sampling_locations has L = {levels}")
    if points == 0:
        raise ValueError("sampling_locations must hold at least one point per level, got P = 0")
    if tuple(attention_weights.shape) != (n, lq, m, levels, points):
        raise ValueError(f"attention_weights must have shape (N, Lq, M, L, P) = "
                         f"{(n, lq, m, levels, points)}, got {tuple(attention_weights.shape)}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}")
    if torch.compiler.is_exporting():  # the checks below read tensor values: eager mode only
        return
    total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    if total != s:
        raise ValueError(f"spatial_shapes {spatial_shapes.tolist()} sum to {total} positions "
                         f"but value has S = {s}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights),
                    ("value", value)):
        # one pass; NaN propagates to the min and max. value too: an off-map corner reads some
        # row with weight 0, and 0 * inf = NaN would leak into queries that never sample it
        if t.numel() and not all(torch.isfinite(x) for x in torch.aminmax(t.detach())):
            raise ValueError(f"{name} must be finite (no NaN or inf)")


def _check_spatial_shapes(spatial_shapes: Tensor) -> None:
    if not isinstance(spatial_shapes, Tensor):
        raise TypeError(f"spatial_shapes must be a torch.Tensor, got {type(spatial_shapes).__name__}")
    if (spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.is_floating_point()
            or spatial_shapes.dtype == torch.bool or spatial_shapes.is_complex()):
        raise ValueError("spatial_shapes must be an integer tensor of shape (L, 2) holding (H, W), "
                         f"got {spatial_shapes.dtype} {tuple(spatial_shapes.shape)}")
    if spatial_shapes.shape[0] == 0:
        raise ValueError("spatial_shapes must hold at least one level, got shape (0, 2)")
    if not torch.compiler.is_exporting() and (spatial_shapes <= 0).any():  # data-dependent: eager only
        raise ValueError(f"spatial_shapes must be positive, got {spatial_shapes.tolist()}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The widest floating dtype among ``tensors``, and at least float32.

    Half precision keeps 8 (bfloat16) or 11 (float16) significant bits: a normalised location
    rounded to bfloat16 can be off by 2^-9 of the map, half a pixel on a 256-pixel-wide level,
    and the bilinear weights inherit that error. PyTorch's CPU autocast likewise runs
    ``grid_sample`` in float32; the caller casts the result back to the value's dtype.
    """
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


class _Bilinear:
    """Per-axis bilinear weights of every sampling point, as ``(N, Lq, M, L, P, 2)`` (x, y) pairs.

    Along x (and likewise y) a point at pixel coordinate ``x`` lies between pixel
    columns ``x0 = floor(x)`` (near) and ``x0 + 1`` (far) with weights ``1 - fx`` and
    ``fx``, ``fx = x - x0``. ``in0`` / ``in1`` say whether those columns exist; a
    missing column gets weight 0, which is ``grid_sample``'s zero padding.
    """

    def __init__(self, sampling_locations: Tensor, spatial_shapes: Tensor):
        self.wh = spatial_shapes.flip(-1).to(sampling_locations.dtype)[:, None]  # (L, 1, 2): (W, H)
        # pixel i covers [i, i + 1), its centre is at i + 0.5 (align_corners=False)
        pix = sampling_locations * self.wh - 0.5
        self.near = pix.floor()
        frac = pix - self.near
        self.in0 = ((self.near >= 0) & (self.near < self.wh)).to(pix.dtype)
        self.in1 = ((self.near >= -1) & (self.near < self.wh - 1)).to(pix.dtype)
        w0, w1 = (1 - frac) * self.in0, frac * self.in1
        self.wx0, self.wy0 = w0.unbind(-1)
        self.wx1, self.wy1 = w1.unbind(-1)

    def corner_weights(self, attention_weights: Tensor) -> Tensor:
        """``(N, Lq, M, 4, L, P)``: attention × bilinear weight of the corners
        top-left, top-right, bottom-left, bottom-right."""
        top, bottom = attention_weights * self.wy0, attention_weights * self.wy1
        return torch.stack((top * self.wx0, top * self.wx1, bottom * self.wx0, bottom * self.wx1), 3)

    def corner_rows(self, spatial_shapes: Tensor, n: int, s: int, m: int) -> Tensor:
        """``(N, Lq, M, 4, L, P)`` row of each corner in value viewed as ``(N·S·M, D)``:
        ``(n·S + level start + y·W + x)·M + head``. Corners off the map get some valid row
        (their weight is 0)."""
        # intermediate rows stay below (n + 3)·s·m (near corners reach one row/column past the map);
        # int64 when exporting: the ONNX translation of embedding_bag mixes int32 indices with int64 offsets
        small = (n + 3) * s * m < 2**31 and not torch.compiler.is_exporting()
        itype = torch.int32 if small else torch.int64
        # clamp first so far-off points cannot overflow the integer arithmetic
        x0, y0 = torch.minimum(self.near.clamp(min=-1), self.wh).to(itype).unbind(-1)
        width = spatial_shapes[:, 1, None].to(itype)  # (L, 1)
        pos = level_start_index(spatial_shapes).to(itype)[:, None] + y0 * width + x0
        batch = torch.arange(n, device=x0.device, dtype=itype).view(n, 1, 1, 1, 1) * s
        head = torch.arange(m, device=x0.device, dtype=itype).view(1, 1, m, 1, 1)
        top_left = (batch + pos) * m + head  # (N, Lq, M, L, P)
        step = torch.stack((torch.zeros_like(width), torch.ones_like(width), width, width + 1))  # (4, L, 1)
        return (top_left.unsqueeze(3) + step * m).clamp_(0, n * s * m - 1)


def _splat(grad: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
           attention_weights: Tensor) -> Tensor:
    """Gradient w.r.t. ``value``: each query's output gradient, times each point's
    attention weight, spread bilinearly onto the 4 pixels around the point (the
    adjoint of sampling). ``grid_sample``'s backward does exactly this spreading,
    natively, so we call it once per level.

    Args:
        grad: ``(N, Lq, M, D)`` gradient of the output.

    Returns:
        ``(N, S, M, D)``.
    """
    n, lq, m, d = grad.shape
    grad_t = grad.permute(0, 2, 3, 1).reshape(n * m, d, 1, lq)  # (N·M, D, 1, Lq)
    out = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # points × queries as grid_sample's output "image": the long Lq axis is innermost
        loc = sampling_locations[:, :, :, lvl].permute(0, 2, 3, 1, 4).flatten(0, 1)  # (N·M, P, Lq, 2)
        attn = attention_weights[:, :, :, lvl].permute(0, 2, 3, 1).reshape(n * m, 1, loc.shape[1], lq)
        like_input = grad.new_empty(()).expand(n * m, d, h, w)  # only its shape is read
        grad_level, _ = torch.ops.aten.grid_sampler_2d_backward(
            grad_t * attn, like_input, 2 * loc - 1, 0, 0, False, [True, False])
        out.append(grad_level.view(n, m, d, h * w).permute(0, 3, 1, 2))  # (N, H·W, M, D)
    return torch.cat(out, 1)


class _MSDeformAttnFunction(torch.autograd.Function):
    """Forward: one ``embedding_bag`` over the corners. Backward written by hand."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, sampling_locations, attention_weights):
        n, s, m, d = value.shape
        lq = sampling_locations.shape[1]
        bil = _Bilinear(sampling_locations, spatial_shapes)
        corners = 4 * attention_weights.shape[3] * attention_weights.shape[4]  # 4·L·P per bag
        rows = bil.corner_rows(spatial_shapes, n, s, m).view(n * lq * m, corners)
        weights = bil.corner_weights(attention_weights).view(n * lq * m, corners)
        ctx.save_for_backward(value, spatial_shapes, sampling_locations, attention_weights, rows)
        ctx.bilinear = bil  # intermediates made inside forward (no autograd history): kept as is
        out = F.embedding_bag(rows, value.reshape(n * s * m, d), mode="sum", per_sample_weights=weights)
        return out.view(n, lq, m * d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, spatial_shapes, sampling_locations, attention_weights, rows = ctx.saved_tensors
        bil = ctx.bilinear
        n, s, m, d = value.shape
        lq = attention_weights.shape[1]
        grad_out = grad_out.reshape(n * lq * m, d)
        grad_value = grad_loc = grad_attn = None
        if ctx.needs_input_grad[0]:
            grad_value = _splat(grad_out.view(n, lq, m, d), spatial_shapes, sampling_locations,
                                attention_weights)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # <grad_out, value row> for every corner, without materialising the gathered rows
            bags, k = rows.shape
            offsets = torch.arange(0, bags * k, k, device=rows.device, dtype=rows.dtype)
            bag_of = torch.arange(bags, device=rows.device, dtype=rows.dtype).repeat_interleave(k)
            dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out, value.reshape(n * s * m, d), rows.view(-1), offsets, bag_of, 0)
            g00, g01, g10, g11 = dots.view(n, lq, m, 4, *attention_weights.shape[3:]).unbind(3)
            top, bottom = bil.wx0 * g00 + bil.wx1 * g01, bil.wx0 * g10 + bil.wx1 * g11
            left, right = bil.wy0 * g00 + bil.wy1 * g10, bil.wy0 * g01 + bil.wy1 * g11
            grad_attn = bil.wy0 * top + bil.wy1 * bottom
            # d w0 / d frac = -in0, d w1 / d frac = in1, and d frac / d loc = (W, H)
            far = torch.stack((right, bottom), -1)
            near = torch.stack((left, top), -1)
            grad_loc = attention_weights.unsqueeze(-1) * (bil.in1 * far - bil.in0 * near) * bil.wh
        return grad_value, None, grad_loc, grad_attn


def multi_scale_deformable_attention(value: Tensor, spatial_shapes: Tensor,
                                     sampling_locations: Tensor,
                                     attention_weights: Tensor) -> Tensor:
    """Attention-weighted bilinear samples of a multi-scale value map.

    Same conventions and numbers as the official ``ms_deform_attn_core_pytorch``
    (``grid_sample`` with ``align_corners=False``, zero padding).

    Args:
        value: ``(N, S, M, D)`` per-head values of all levels, flattened and
            concatenated level after level (``S = Σ H_l·W_l``).
        spatial_shapes: ``(L, 2)`` integer (H, W) of each level.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised (x, y); (0, 0) is
            the top-left corner of the map and (1, 1) the bottom-right one.
            Points outside [0, 1] read zeros.
        attention_weights: ``(N, Lq, M, L, P)`` weight of each sample.

    The three may have different floating dtypes (as under ``torch.autocast``): the
    sum is computed in the widest of them and at least float32, and returned in
    ``value``'s dtype; gradients come back in each input's dtype.

    Returns:
        ``(N, Lq, M·D)`` heads concatenated along the channels, ``value.dtype``.
    """
    _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    dtype = _compute_dtype(value, sampling_locations, attention_weights)
    # cast explicitly: none of the ops inside is on autocast's lower-precision list
    out = _MSDeformAttnFunction.apply(value.to(dtype), spatial_shapes.to(value.device),
                                      sampling_locations.to(dtype), attention_weights.to(dtype))
    return out.to(value.dtype)


def multi_scale_deformable_attention_grid_sample(value: Tensor, spatial_shapes: Tensor,
                                                 sampling_locations: Tensor,
                                                 attention_weights: Tensor) -> Tensor:
    """The straightforward formulation: one ``F.grid_sample`` per level, stack, weight, sum.

    Same arguments and result as :func:`multi_scale_deformable_attention`; it
    materialises every sample, ``(N·M, D, Lq, L·P)``, so it is slower and larger.
    The book builds it first and the benchmark compares against it.
    """
    _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    out_dtype, dtype = value.dtype, _compute_dtype(value, sampling_locations, attention_weights)
    value, sampling_locations, attention_weights = (
        t.to(dtype) for t in (value, sampling_locations, attention_weights))
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    sizes = [h * w for h, w in spatial_shapes.tolist()]
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        v = value.split(sizes, dim=1)[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N·M, Lq, P, 2)
        samples.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (N·M, D, Lq, P)
    samples = torch.stack(samples, -2).flatten(-2)  # (N·M, D, Lq, L·P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    return (samples * weights).sum(-1).view(n, m * d, lq).transpose(1, 2).to(out_dtype)
