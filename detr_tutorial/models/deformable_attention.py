"""Multi-scale deformable attention module (Deformable DETR, Zhu et al. 2021).

Instead of comparing a query with every key, each query predicts, per head and
per level, ``n_points`` small offsets around its reference point and one weight
per offset (softmax over all levels × points of the head). The values are
bilinearly sampled at those locations and summed with the weights
(:func:`detr_tutorial.ops.multi_scale_deformable_attention`). Cost grows with
the number of queries, not with the number of keys.

Submodule names, initialisation and forward signature follow the official
``MSDeformAttn`` so official state dicts load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import level_start_index, multi_scale_deformable_attention

__all__ = ["MSDeformAttn", "initial_sampling_offsets"]


def initial_sampling_offsets(n_heads: int, n_levels: int, n_points: int) -> Tensor:
    """The official initial offsets: head ``h`` looks along direction ``2πh / n_heads``,
    stretched onto the square ``max(|x|, |y|) = 1``; point ``i`` goes ``i + 1`` times as far.

    Returns:
        ``(n_heads, n_levels, n_points, 2)`` offsets in pixels of each level, (x, y).
    """
    angles = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    directions = torch.stack([angles.cos(), angles.sin()], -1)  # (n_heads, 2)
    directions = directions / directions.abs().max(-1, keepdim=True).values
    scale = torch.arange(1, n_points + 1, dtype=torch.float32)  # (n_points,)
    offsets = directions[:, None, None, :] * scale[None, None, :, None]  # (n_heads, 1, n_points, 2)
    return offsets.expand(n_heads, n_levels, n_points, 2).clone()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels of queries and values.
        n_levels: number of feature levels.
        n_heads: attention heads; must divide ``d_model``.
        n_points: sampling points per head and per level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        for name, v in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads),
                        ("n_points", n_points)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # offsets start as a fixed ring of points whatever the query; attention starts uniform
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(
                initial_sampling_offsets(self.n_heads, self.n_levels, self.n_points).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling(self, query: Tensor, reference_points: Tensor,
                 input_spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """Where each query looks and how much each look counts.

        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N, Lq, L, 2)`` normalised (x, y) per level, or
                ``(N, Lq, L, 4)`` boxes (cx, cy, w, h).
            input_spatial_shapes: ``(L, 2)`` (H, W) per level.

        Returns:
            sampling_locations ``(N, Lq, M, L, P, 2)`` and attention weights ``(N, Lq, M, L, P)``.
        """
        n, lq, _ = query.shape
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        if not reference_points.is_floating_point():
            raise TypeError(f"reference_points must be a floating-point tensor, got {reference_points.dtype}")
        if reference_points.dim() != 4 or reference_points.shape[:3] != (n, lq, lv):
            raise ValueError(f"reference_points must have shape (N, Lq, n_levels, 2 or 4) = "
                             f"({n}, {lq}, {lv}, ...), got {tuple(reference_points.shape)}")
        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, lv * p)
        weights = F.softmax(weights, -1).view(n, lq, m, lv, p)  # softmax over levels × points jointly
        ref = reference_points[:, :, None, :, None, :]  # (N, Lq, 1, L, 1, 2 or 4)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by that level's (W, H)
            wh = input_spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2)
            locations = ref + offsets / wh[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the box: n_points steps reach half its width / height
            locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
        else:
            raise ValueError("last dim of reference_points must be 2 (points) or 4 (boxes), "
                             f"got {reference_points.shape[-1]}")
        return locations, weights

    @staticmethod
    def _check_spatial_shapes(spatial_shapes: Tensor, level_start: Tensor, s: int) -> None:
        """Raise unless the levels' (H, W) sum to ``s`` positions and ``level_start`` fits them; these
        checks read tensor values, which an exported graph cannot, so they run in eager mode only."""
        if torch.compiler.is_exporting():
            return
        if int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum()) != s:
            raise ValueError(f"input_spatial_shapes {spatial_shapes.tolist()} do not sum "
                             f"to the {s} positions of input_flatten")
        expected_start = level_start_index(spatial_shapes)
        if level_start.tolist() != expected_start.tolist():
            raise ValueError(f"input_level_start_index must be {expected_start.tolist()} for "
                             f"input_spatial_shapes {spatial_shapes.tolist()}, got {level_start.tolist()}")

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                input_spatial_shapes: Tensor, input_level_start_index: Tensor,
                input_padding_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N, Lq, L, 2)`` in [0, 1], (0, 0) top-left of the
                padded image, or ``(N, Lq, L, 4)`` reference boxes (cx, cy, w, h).
            input_flatten: ``(N, S, C)`` all levels flattened and concatenated.
            input_spatial_shapes: ``(L, 2)`` (H, W) per level, ``S = Σ H·W``.
            input_level_start_index: ``(L,)`` offset of each level in ``S``
                (the official CUDA kernel's argument; checked against
                ``input_spatial_shapes``, then recomputed by the core).
            input_padding_mask: ``(N, S)`` True on padding; those values are zeroed.

        Returns:
            ``(N, Lq, C)``.
        """
        for name, t in (("query", query), ("reference_points", reference_points),
                        ("input_flatten", input_flatten), ("input_spatial_shapes", input_spatial_shapes),
                        ("input_level_start_index", input_level_start_index)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query.dim() != 3 or input_flatten.dim() != 3:
            raise ValueError(f"query (N, Lq, C) and input_flatten (N, S, C) must be 3-d, got "
                             f"{tuple(query.shape)} and {tuple(input_flatten.shape)}")
        n, s, c = input_flatten.shape
        if c != self.d_model or query.shape[-1] != self.d_model:
            raise ValueError(f"query and input_flatten must have {self.d_model} channels, got "
                             f"{query.shape[-1]} and {c}")
        if query.shape[0] != n:
            raise ValueError(f"query has batch {query.shape[0]} but input_flatten has {n}")
        if tuple(input_spatial_shapes.shape) != (self.n_levels, 2):
            raise ValueError(f"input_spatial_shapes must have shape ({self.n_levels}, 2), "
                             f"got {tuple(input_spatial_shapes.shape)}")
        self._check_spatial_shapes(input_spatial_shapes, input_level_start_index, s)
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            if not isinstance(input_padding_mask, Tensor) or input_padding_mask.dtype != torch.bool:
                raise TypeError("input_padding_mask must be a bool tensor (True on padding), got "
                                f"{getattr(input_padding_mask, 'dtype', type(input_padding_mask).__name__)}")
            if tuple(input_padding_mask.shape) != (n, s):
                raise ValueError(f"input_padding_mask must have shape {(n, s)}, "
                                 f"got {tuple(input_padding_mask.shape)}")
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)  # (N, S, M, D)
        locations, weights = self.sampling(query, reference_points, input_spatial_shapes)
        out = multi_scale_deformable_attention(value, input_spatial_shapes, locations, weights)
        return self.output_proj(out)  # (N, Lq, C)
