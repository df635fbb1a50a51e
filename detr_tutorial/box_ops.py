"""Bounding boxes: format conversions, IoU and Generalized IoU.

Two formats appear throughout the book:

* ``cxcywh`` -- centre x, centre y, width, height, normalised to [0, 1] by the
  image size. DETR's box head predicts this format (after a sigmoid) and the
  targets are stored in it.
* ``xyxy`` -- corners (x0, y0, x1, y1), normalised or in pixels. IoU, GIoU and
  COCO evaluation work on corners.

The names follow the official DETR code (``util/box_ops.py``). Unlike the
official code, invalid boxes raise a ``ValueError`` that names the offending
rows instead of failing a bare ``assert`` (detr issue 509).

Precision: :func:`box_area`, :func:`box_iou` and :func:`generalized_box_iou`
compute in at least float32 and return float32 for float16/bfloat16 boxes
(float64 stays float64). In float16 the area of a 300-pixel box (90,000)
overflows the largest finite value (65,504) and the area of a 0.001-wide
normalised box underflows to 0, so half-precision IoUs would be wrong.
"""
from __future__ import annotations

import torch
import torchvision.ops as tv_ops
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "check_boxes_xyxy",
    "pairwise_iou_union",
    "giou_from_iou_union",
]


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    """(..., 4) boxes as (cx, cy, w, h) -> (..., 4) boxes as (x0, y0, x1, y1)."""
    _check_last_dim(x, "x")
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    """(..., 4) boxes as (x0, y0, x1, y1) -> (..., 4) boxes as (cx, cy, w, h)."""
    _check_last_dim(x, "x")
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def check_boxes_xyxy(boxes: Tensor, name: str = "boxes") -> None:
    """Raise ``ValueError`` unless ``boxes`` is an (N, 4) tensor of finite,
    non-degenerate corner boxes (x1 >= x0 and y1 >= y0)."""
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, 4), got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) in (x0, y0, x1, y1) format, got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {boxes.dtype}")
    bad = ~torch.isfinite(boxes).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{name} has non-finite values (NaN or inf) in rows {_short(rows)}")
    bad = (boxes[:, 2:] < boxes[:, :2]).any(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{name} has degenerate boxes (x1 < x0 or y1 < y0) in rows {_short(rows)}: "
            f"first is {[round(v, 4) for v in boxes[rows[0]].tolist()]}; boxes must be (x0, y0, x1, y1) -- "
            "convert (cx, cy, w, h) boxes with box_cxcywh_to_xyxy first"
        )


def box_area(boxes: Tensor) -> Tensor:
    """(N, 4) xyxy boxes -> (N,) areas, float32 for half-precision boxes (see the module docstring)."""
    check_boxes_xyxy(boxes)
    return tv_ops.box_area(_upcast(boxes))


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes.

    Returns ``(iou, union)``, both (N, M), as the official code does (the union
    is reused by :func:`generalized_box_iou`); float32 for half-precision boxes.
    """
    check_boxes_xyxy(boxes1, "boxes1")
    check_boxes_xyxy(boxes2, "boxes2")
    iou, union = pairwise_iou_union(_upcast(boxes1), _upcast(boxes2))
    _check_union(union)
    return iou, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise Generalized IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M) in [-1, 1].

    GIoU = IoU - |C minus (A union B)| / |C|, with C the smallest box enclosing
    both (Rezatofighi et al., 2019); float32 for half-precision boxes.
    """
    check_boxes_xyxy(boxes1, "boxes1")
    check_boxes_xyxy(boxes2, "boxes2")
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    iou, union = pairwise_iou_union(boxes1, boxes2)
    _check_union(union)
    return giou_from_iou_union(boxes1, boxes2, iou, union)


def pairwise_iou_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of (..., N, 4) and (..., M, 4) xyxy boxes -> two (..., N, M) tensors.

    No checks and no upcasting: the caller guarantees valid boxes (as
    :func:`box_iou` does). Leading dimensions are batch dimensions, so a
    (B, Q, 4) and a (B, n, 4) tensor give B separate (Q, n) blocks.
    The operations are those of the official ``util/box_ops.box_iou``.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])  # (..., N)
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])  # (..., M)
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # (..., N, M, 2)
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # (..., N, M, 2)
    wh = (rb - lt).clamp(min=0)  # (..., N, M, 2)
    inter = wh[..., 0] * wh[..., 1]  # (..., N, M)
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union, union


def giou_from_iou_union(boxes1: Tensor, boxes2: Tensor, iou: Tensor, union: Tensor) -> Tensor:
    """GIoU (..., N, M) from :func:`pairwise_iou_union`'s results: IoU minus the share of
    the enclosing box that the union leaves empty. No checks, no upcasting."""
    lt = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)  # (..., N, M, 2)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def _upcast(boxes: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; float32 and float64 unchanged."""
    return boxes.float() if boxes.dtype in (torch.float16, torch.bfloat16) else boxes


def _check_union(union: Tensor) -> None:
    # Two zero-area boxes have an empty union: IoU would be 0/0 = NaN.
    if (union <= 0).any():
        i, j = (union <= 0).nonzero()[0].tolist()
        raise ValueError(
            f"boxes1[{i}] and boxes2[{j}] both have zero area, so their IoU is undefined (0/0); "
            "give boxes a positive width and height"
        )


def _check_last_dim(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4), got {tuple(x.shape)}")


def _short(rows: list[int], n: int = 8) -> str:
    return str(rows[:n])[:-1] + (", ...]" if len(rows) > n else "]")
