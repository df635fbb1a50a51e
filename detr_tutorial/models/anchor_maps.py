"""The positional attention of one DAB-DETR anchor over an image grid, for figures and widgets.

DAB-DETR (Liu et al., 2022, eq. 6) writes the positional part of the
cross-attention logit between an anchor (x_ref, y_ref, w, h) and a pixel (x, y) as::

    (PE(x) . PE(x_ref) * w_ref / w  +  PE(y) . PE(y_ref) * h_ref / h) / sqrt(D)

with PE the sine encoding of one coordinate (F channels, D = 2F) and (w_ref, h_ref)
the reference size the model predicts from the content query (``ref_anchor_head``).
Dividing by the anchor's width sharpens the attention along x for a narrow anchor and
spreads it for a wide one; the same holds for y and h. The learned projections of
the real decoder are left out: this is the formula the projections start from.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .conditional_layers import sine_embed_points

__all__ = ["anchor_attention_map", "attention_spread"]


def _pixel_centres(n: int) -> Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def anchor_attention_map(anchor: Union[Tensor, Sequence[float]], size: tuple[int, int],
                         ref_wh: Optional[tuple[float, float]] = (0.5, 0.5), num_pos_feats: int = 128,
                         temperature: float = 20) -> Tensor:
    """Softmax over the pixels of an (H, W) grid of the positional logits of ``anchor``.

    Args:
        anchor: (cx, cy, w, h), normalised to [0, 1], w and h > 0.
        size: (H, W) of the grid; pixel centres are at ((j + 0.5) / W, (i + 0.5) / H).
        ref_wh: the reference (w_ref, h_ref) in (0, 1]; ``(0.5, 0.5)`` is ``sigmoid(0)``, a
            ``ref_anchor_head`` with zero output. ``None``: no modulation (Conditional DETR's
            positional logit, both terms with weight 1).
        num_pos_feats: F, channels of the sine encoding per coordinate.
        temperature: of the sine encoding (DAB-DETR's image positions use 20).

    Returns:
        (H, W) float32 attention weights summing to 1.
    """
    anchor = torch.as_tensor(anchor, dtype=torch.float64)
    if anchor.shape != (4,):
        raise ValueError(f"anchor must be (cx, cy, w, h), got shape {tuple(anchor.shape)}")
    if not ((anchor >= 0) & (anchor <= 1)).all() or not (anchor[2:] > 0).all():
        raise ValueError(f"anchor must lie in [0, 1] with w, h > 0, got {anchor.tolist()}")
    if len(size) != 2 or not all(isinstance(n, int) and n > 0 for n in size):
        raise ValueError(f"size must be (H, W) of positive ints, got {size!r}")
    if ref_wh is not None and (len(ref_wh) != 2 or not all(0 < r <= 1 for r in ref_wh)):
        raise ValueError(f"ref_wh must be None or (w_ref, h_ref) in (0, 1], got {ref_wh!r}")
    height, width = size
    # sine_embed_points lists (y, x): take each coordinate's F channels
    xs = sine_embed_points(torch.stack([_pixel_centres(width)] * 2, -1), num_pos_feats, temperature)
    ys = sine_embed_points(torch.stack([_pixel_centres(height)] * 2, -1), num_pos_feats, temperature)
    ref = sine_embed_points(anchor[None, :2], num_pos_feats, temperature)[0]  # (2F,) as (y, x)
    f = num_pos_feats
    x_logit = xs[:, f:] @ ref[f:]  # (W,) PE(x) . PE(x_ref)
    y_logit = ys[:, :f] @ ref[:f]  # (H,) PE(y) . PE(y_ref)
    if ref_wh is not None:
        x_logit = x_logit * ref_wh[0] / anchor[2]
        y_logit = y_logit * ref_wh[1] / anchor[3]
    logits = (y_logit[:, None] + x_logit[None, :]) / math.sqrt(2 * f)  # (H, W)
    return logits.flatten().softmax(0).view(height, width).float()


def attention_spread(weights: Tensor) -> tuple[float, float]:
    """Standard deviation along x and along y (normalised units) of an (H, W) attention map."""
    if not isinstance(weights, Tensor) or weights.dim() != 2:
        raise ValueError("weights must be an (H, W) tensor, got "
                         f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}")
    height, width = weights.shape
    weights = weights.double() / weights.sum()
    spreads = []
    for marginal, centres in ((weights.sum(0), _pixel_centres(width)), (weights.sum(1), _pixel_centres(height))):
        mean = (marginal * centres).sum()
        spreads.append(float((marginal * (centres - mean) ** 2).sum().sqrt()))
    return spreads[0], spreads[1]
