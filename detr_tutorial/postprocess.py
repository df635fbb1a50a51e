"""From raw model outputs to scored pixel boxes, the format COCO evaluation reads.

A DETR-family model returns, for every image of a batch, ``Q`` query slots:

* ``pred_logits`` (B, Q, C) class scores
* ``pred_boxes``  (B, Q, 4) normalised (cx, cy, w, h) boxes in [0, 1]

Two conventions turn them into detections:

* :class:`PostProcess` (DETR): ``C = K + 1`` with a last "no object" class;
  softmax over the ``K + 1`` classes, drop "no object", keep each query's best
  class. One detection per query.
* :class:`PostProcessTopK` (Deformable DETR): ``C = K`` independent sigmoid
  scores (focal loss, no "no object" class); keep the ``k`` best
  (query, class) pairs over all ``Q * K`` of them, so a query may appear with
  several classes.

Both return one dict per image with ``scores`` (N,), ``labels`` (N,) int64
and ``boxes`` (N, 4) absolute (x0, y0, x1, y1) pixels of ``target_sizes``.

Each knows its ``num_classes`` and checks the logits' last dimension, so a
model of the other convention is an error: read by :class:`PostProcess`,
sigmoid logits would lose their last real class as "no object"; read by
:class:`PostProcessTopK`, softmax logits would return "no object" as a
confident class. Non-finite logits or boxes are an error too (a NaN score
would be ranked last by COCO evaluation instead of failing). Half-precision
outputs are post-processed in float32, so scores and boxes are float32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy
from .matcher import check_outputs

__all__ = ["PostProcess", "PostProcessTopK", "scale_boxes"]


def _check_inputs(outputs: dict, target_sizes: Tensor, num_classes: int, focal: bool) -> tuple[Tensor, Tensor]:
    if not isinstance(outputs, dict) or "pred_logits" not in outputs or "pred_boxes" not in outputs:
        raise TypeError("outputs must be a dict with 'pred_logits' (B, Q, C) and 'pred_boxes' (B, Q, 4)")
    check_outputs(outputs, num_classes, focal)
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    for key, value in (("pred_logits", logits), ("pred_boxes", boxes)):
        if not torch.isfinite(value).all():
            raise ValueError(f"outputs['{key}'] has NaN or inf entries (first at index "
                             f"{tuple((~torch.isfinite(value)).nonzero()[0].tolist())})")
    if not isinstance(target_sizes, Tensor) or target_sizes.shape != (logits.shape[0], 2):
        shape = tuple(target_sizes.shape) if isinstance(target_sizes, Tensor) else type(target_sizes).__name__
        raise ValueError(f"target_sizes must be a ({logits.shape[0]}, 2) tensor of (H, W), got {shape}")
    if logits.dtype in (torch.float16, torch.bfloat16):  # pixel boxes of large images need float32
        logits, boxes = logits.float(), boxes.float()
    return logits, boxes


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (object classes, without 'no object'), "
                         f"got {num_classes!r}")
    return num_classes


def scale_boxes(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """Normalised (cx, cy, w, h) boxes (B, N, 4) -> pixel (x0, y0, x1, y1) boxes (B, N, 4).

    ``target_sizes`` (B, 2) holds each image's (H, W).
    """
    img_h, img_w = target_sizes.to(boxes.dtype).unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # (B, 4)
    return box_cxcywh_to_xyxy(boxes) * scale[:, None, :]


class PostProcess(nn.Module):
    """DETR: softmax, drop the "no object" class, best class per query.

    Args:
        num_classes: object classes K; the logits must have K + 1 columns.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = _check_num_classes(num_classes)

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``outputs`` with pred_logits (B, Q, K+1), pred_boxes (B, Q, 4); ``target_sizes`` (B, 2) as (H, W).

        Returns B dicts of ``scores`` (Q,), ``labels`` (Q,), ``boxes`` (Q, 4) pixel xyxy.
        """
        logits, boxes = _check_inputs(outputs, target_sizes, self.num_classes, focal=False)
        prob = logits.softmax(-1)
        scores, labels = prob[..., :-1].max(-1)  # (B, Q), the last class is "no object"
        pixel_boxes = scale_boxes(boxes, target_sizes)
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, pixel_boxes)]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class PostProcessTopK(nn.Module):
    """Deformable DETR: sigmoid, the ``k`` best (query, class) pairs per image.

    Args:
        num_classes: object classes K; the logits must have K columns (no "no object").
        k: detections kept per image (100 as in Deformable DETR); when the
            model has fewer than ``k`` (query, class) pairs, all are kept.
    """

    def __init__(self, num_classes: int, k: int = 100) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.num_classes = _check_num_classes(num_classes)
        self.k = k

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``outputs`` with pred_logits (B, Q, K), pred_boxes (B, Q, 4); ``target_sizes`` (B, 2) as (H, W).

        Returns B dicts of ``scores`` (k,), ``labels`` (k,), ``boxes`` (k, 4) pixel xyxy,
        sorted by decreasing score.
        """
        logits, boxes = _check_inputs(outputs, target_sizes, self.num_classes, focal=True)
        batch, _, num_classes = logits.shape
        prob = logits.sigmoid().flatten(1)  # (B, Q * K), index = query * K + class
        scores, index = prob.topk(min(self.k, prob.shape[1]), dim=1)
        query, labels = index // num_classes, index % num_classes
        pixel_boxes = scale_boxes(boxes, target_sizes)
        picked = torch.gather(pixel_boxes, 1, query.unsqueeze(-1).expand(batch, -1, 4))
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, picked)]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, k={self.k}"
