"""Hungarian matching: a one-to-one assignment of predictions to targets.

DETR predicts a fixed set of ``Q`` boxes per image and the image holds ``n <= Q``
objects. Before any loss can be computed, each target must be paired with
exactly one prediction; the remaining ``Q - n`` predictions are trained to say
"no object". The pairing minimises a matching cost (Carion et al., 2020)::

    C[q, t] = cost_class * C_class[q, t] + cost_bbox * ||b_q - b_t||_1 - cost_giou * GIoU(b_q, b_t)

with ``C_class = -p_q(c_t)`` (softmax probability of the target's class), and
the assignment is solved exactly with the Hungarian algorithm (Kuhn, 1955),
``scipy.optimize.linear_sum_assignment``. The cost carries no gradient.

Two conventions for the logits, fixed by ``focal_alpha`` and checked against
``num_classes`` (a mismatch is an error, never a silent misreading):

* softmax (DETR, ``focal_alpha=None``): ``num_classes + 1`` logits per query,
  the last one "no object";
* sigmoid / focal (Deformable DETR, Zhu et al., 2021, ``focal_alpha`` a number):
  ``num_classes`` independent logits, no "no object" logit; ``C_class`` is the
  difference of the focal losses for a positive and a negative label.

The official code computes the cost of every prediction of the batch against
every target of the batch, (B*Q, sum n_i), and uses only the diagonal blocks.
:meth:`HungarianMatcher.forward` computes only each image's (Q, n_i) block
(padded to the batch's largest n_i); :meth:`HungarianMatcher.cost_matrix`
keeps the batch-wide form for teaching and testing. Costs are computed in
float32 (float64 stays float64) whatever the model's dtype. Unlike the
official code, malformed targets raise ``ValueError`` -- in particular more
targets than queries, which the official matcher would silently leave partly
unmatched.
"""
from __future__ import annotations

from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .box_ops import box_cxcywh_to_xyxy, giou_from_iou_union, pairwise_iou_union

__all__ = ["HungarianMatcher", "focal_class_cost", "check_outputs", "check_targets", "check_convention"]

Indices = list[tuple[Tensor, Tensor]]


class HungarianMatcher(nn.Module):
    """Match predictions to targets, one to one, by minimum total cost.

    Args (keyword-only):
        num_classes: number of object classes K, without "no object".
        cost_class: weight of the classification cost (DETR 1, Deformable DETR 2).
        cost_bbox: weight of the L1 distance between (cx, cy, w, h) boxes (5).
        cost_giou: weight of the negative Generalized IoU (2).
        focal_alpha: ``None`` for DETR's softmax class cost over K+1 logits; a
            number (0.25 in Deformable DETR) for the sigmoid focal class cost over K logits.
        focal_gamma: focusing exponent of the focal class cost (2).
    """

    def __init__(self, *, num_classes: int, cost_class: float = 1, cost_bbox: float = 5, cost_giou: float = 2,
                 focal_alpha: float | None = None, focal_gamma: float = 2.0):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int (object classes, without 'no object'), "
                             f"got {num_classes!r}")
        for name, value in [("cost_class", cost_class), ("cost_bbox", cost_bbox), ("cost_giou", cost_giou),
                            ("focal_gamma", focal_gamma)]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("cost_class, cost_bbox and cost_giou are all 0: the matching would be arbitrary")
        if focal_alpha is not None and (isinstance(focal_alpha, bool) or not isinstance(focal_alpha, (int, float))
                                        or not 0 <= focal_alpha <= 1):
            raise ValueError(f"focal_alpha must be None (softmax class cost) or a number in [0, 1], "
                             f"got {focal_alpha!r}")
        self.num_classes = num_classes
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @property
    def focal(self) -> bool:
        """True for the sigmoid / focal convention (K logits), False for softmax (K+1)."""
        return self.focal_alpha is not None

    @torch.no_grad()
    def cost_matrix(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> Tensor:
        """The matching cost of every prediction against every target of the batch.

        Args:
            outputs: ``pred_logits`` (B, Q, K+1) -- or (B, Q, K) with ``focal_alpha`` --
                and ``pred_boxes`` (B, Q, 4), normalised (cx, cy, w, h).
            targets: B dicts with ``labels`` (n_i,) int64 and ``boxes`` (n_i, 4)
                normalised (cx, cy, w, h).

        Returns:
            C: (B, Q, sum_i n_i), the official batch-wide form. Only the block
            ``C[i, :, targets of image i]`` is used for image ``i``;
            :meth:`forward` computes only those blocks.
        """
        self._validate(outputs, targets)
        bs, num_queries = outputs["pred_logits"].shape[:2]
        # Flatten the batch so one cost computation serves all images.
        logits = outputs["pred_logits"].flatten(0, 1)  # (B*Q, K+1) or (B*Q, K)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)  # (B*Q, 4)
        tgt_ids = torch.cat([t["labels"] for t in targets])  # (N,)
        tgt_bbox = torch.cat([t["boxes"] for t in targets])  # (N, 4)
        C = self._cost(logits, out_bbox, tgt_ids, tgt_bbox)  # (B*Q, N)
        _check_finite(C)
        return C.view(bs, num_queries, -1)

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> Indices:
        """Returns B pairs ``(pred_idx, target_idx)`` of int64 tensors of length n_i:
        prediction ``pred_idx[k]`` is matched to target ``target_idx[k]``
        (``pred_idx`` sorted increasingly, as ``linear_sum_assignment`` returns it)."""
        self._validate(outputs, targets)
        return self.match(outputs, targets)

    @torch.no_grad()
    def match(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> Indices:
        """:meth:`forward` without validating its arguments, for callers that did (the
        :class:`~detr_tutorial.losses.SetCriterion` checks the targets once per batch,
        not once per decoder layer). Solves each image's (Q, n_i) block only."""
        sizes = [len(t["labels"]) for t in targets]
        if max(sizes, default=0) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        # Pad the targets to the largest n_i; padded columns hold a valid dummy box and are never read.
        tgt_ids = pad_sequence([t["labels"] for t in targets], batch_first=True)  # (B, n_max)
        tgt_bbox = pad_sequence([t["boxes"] for t in targets], batch_first=True, padding_value=0.5)  # (B, n_max, 4)
        C = self._cost(outputs["pred_logits"], outputs["pred_boxes"], tgt_ids, tgt_bbox)  # (B, Q, n_max)
        valid = torch.arange(C.shape[-1], device=C.device) < torch.as_tensor(sizes, device=C.device)[:, None]
        _check_finite(C.masked_fill(~valid[:, None, :], 0))
        C = C.cpu().numpy()
        indices = [linear_sum_assignment(c[:, :n]) for c, n in zip(C, sizes)]  # c[:, :n]: (Q, n_i)
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]

    def _cost(self, logits: Tensor, out_bbox: Tensor, tgt_ids: Tensor, tgt_bbox: Tensor) -> Tensor:
        """Cost of (..., Q, C) logits and (..., Q, 4) boxes against (..., n) labels and
        (..., n, 4) boxes -> (..., Q, n), in float32 (float64 stays float64)."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits, out_bbox = logits.float(), out_bbox.float()
        tgt_bbox = tgt_bbox.to(out_bbox.dtype)
        if self.focal_alpha is None:
            # -p(target class); the constant 1 of "1 - p" does not change the matching.
            cost_class = -_take_classes(logits.softmax(-1), tgt_ids)
        else:
            cost_class = focal_class_cost(logits, tgt_ids, self.focal_alpha, self.focal_gamma)
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        out_xyxy, tgt_xyxy = box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox)
        # Valid boxes: target widths are checked > 0, so no union is empty.
        cost_giou = -giou_from_iou_union(out_xyxy, tgt_xyxy, *pairwise_iou_union(out_xyxy, tgt_xyxy))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    def _validate(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> None:
        check_outputs(outputs, self.num_classes, focal=self.focal)
        bs, num_queries = outputs["pred_logits"].shape[:2]
        check_targets(targets, batch_size=bs, num_classes=self.num_classes, num_queries=num_queries)

    def extra_repr(self) -> str:
        focal = "" if self.focal_alpha is None else f", focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        return (f"num_classes={self.num_classes}, cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
                f"cost_giou={self.cost_giou}{focal}")


def focal_class_cost(logits: Tensor, tgt_ids: Tensor, alpha: float, gamma: float) -> Tensor:
    """Deformable DETR's class cost: (..., M, K) sigmoid logits, (..., N) labels -> (..., M, N).

    The focal loss of calling the prediction positive for the target's class
    minus the focal loss of calling it negative (the 1e-8 guards log(0), as in
    the official code).
    """
    prob = logits.sigmoid()  # (..., M, K)
    neg_cost = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
    pos_cost = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return _take_classes(pos_cost, tgt_ids) - _take_classes(neg_cost, tgt_ids)


def _take_classes(scores: Tensor, ids: Tensor) -> Tensor:
    """(..., M, K) per-class scores, (..., N) class ids -> (..., M, N) = ``scores[..., :, ids]``
    (with batch dimensions, each batch entry reads its own ids)."""
    if ids.dim() == 1:
        return scores[..., ids]
    return scores.gather(-1, ids.unsqueeze(-2).expand(*scores.shape[:-1], ids.shape[-1]))


def _check_finite(C: Tensor) -> None:
    if not torch.isfinite(C).all():
        raise ValueError("the matching cost has NaN or inf entries: check outputs['pred_logits'] and "
                         "outputs['pred_boxes'] for NaN/inf")


def check_convention(num_logits: int, num_classes: int, focal: bool, name: str = "outputs['pred_logits']") -> None:
    """Raise ``ValueError`` unless ``num_logits`` logits per query fit ``num_classes`` under the
    convention: K+1 (softmax, last logit "no object") or, with ``focal``, K (sigmoid / focal)."""
    expected = num_classes if focal else num_classes + 1
    if num_logits == expected:
        return
    this = (f"the sigmoid/focal convention (Deformable DETR): {num_classes} logits, one per class"
            if focal else f"the softmax convention (DETR): {num_classes} class logits plus a last 'no object' logit")
    hint = ""
    if num_logits == (num_classes + 1 if focal else num_classes):
        hint = (" -- these logits follow the softmax convention (a 'no object' logit); use a softmax component "
                "(focal_alpha=None, PostProcess)" if focal else
                " -- these logits follow the sigmoid/focal convention (no 'no object' logit); use a focal component "
                "(focal_alpha set, PostProcessTopK)")
    raise ValueError(f"{name} has {num_logits} logits per query, but this component uses {this}, so it expects "
                     f"{expected} for num_classes={num_classes}{hint}")


def check_outputs(outputs: dict[str, Tensor], num_classes: int, focal: bool = False) -> None:
    """Check a model's ``outputs`` dict: ``pred_logits`` (B, Q, K+1) (softmax, last class
    "no object") or, with ``focal=True``, (B, Q, K), where K = ``num_classes``; ``pred_boxes`` (B, Q, 4)."""
    if not isinstance(outputs, dict):
        raise TypeError(f"outputs must be a dict with 'pred_logits' and 'pred_boxes', got {type(outputs).__name__}")
    for key in ("pred_logits", "pred_boxes"):
        if key not in outputs:
            raise ValueError(f"outputs has no '{key}' (keys: {sorted(outputs)})")
        if not isinstance(outputs[key], Tensor) or not outputs[key].is_floating_point():
            raise TypeError(f"outputs['{key}'] must be a floating-point tensor")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3:
        raise ValueError(f"outputs['pred_logits'] must have shape (batch, queries, classes), got {tuple(logits.shape)}")
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[:2] != logits.shape[:2]:
        raise ValueError(f"outputs['pred_boxes'] must have shape {tuple(logits.shape[:2]) + (4,)} to match "
                         f"pred_logits {tuple(logits.shape)}, got {tuple(boxes.shape)}")
    check_convention(logits.shape[-1], num_classes, focal)


def check_targets(targets: Sequence[dict[str, Tensor]], batch_size: int, num_classes: int,
                  num_queries: int | None = None) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``targets`` is ``batch_size``
    dicts with ``labels`` (n,) int64 in [0, num_classes - 1] and ``boxes``
    (n, 4) normalised (cx, cy, w, h) with 0 <= cx, cy <= 1 and 0 < w, h <= 1,
    and (if given) n <= ``num_queries``."""
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of dicts (one per image), got {type(targets).__name__}")
    if len(targets) != batch_size:
        raise ValueError(f"targets has {len(targets)} entries but the outputs hold {batch_size} images")
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "labels" not in t or "boxes" not in t:
            raise ValueError(f"targets[{i}] must be a dict with 'labels' and 'boxes'")
        labels, boxes = t["labels"], t["boxes"]
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
            raise TypeError(f"targets[{i}]['labels'] must be an int64 tensor of shape (n,)")
        if not isinstance(boxes, Tensor) or not boxes.is_floating_point() or boxes.shape != (len(labels), 4):
            raise ValueError(f"targets[{i}]['boxes'] must be a float tensor of shape ({len(labels)}, 4), "
                             f"got {getattr(boxes, 'shape', type(boxes).__name__)}")
    # Values are checked for the whole batch at once (this runs for every decoder layer of every
    # training step); only when something is wrong do we look for the image to name.
    values_ok = not targets or not (_bad_labels(torch.cat([t["labels"] for t in targets]), num_classes).any()
                                    or _bad_boxes(torch.cat([t["boxes"] for t in targets])).any())
    for i, t in enumerate(targets):
        labels, boxes = t["labels"], t["boxes"]
        if not values_ok and _bad_labels(labels, num_classes).any():
            raise ValueError(f"targets[{i}]['labels'] must lie in [0, {num_classes - 1}] (class {num_classes} "
                             f"is 'no object' and never a target), got {labels.tolist()}")
        if not values_ok and _bad_boxes(boxes).any():
            raise ValueError(f"targets[{i}]['boxes'] must be normalised (cx, cy, w, h) with values in [0, 1] "
                             f"and w, h > 0 (divide pixel boxes by the image size), got {boxes.tolist()}")
        if num_queries is not None and len(labels) > num_queries:
            raise ValueError(f"targets[{i}] has {len(labels)} objects but the model predicts only {num_queries} "
                             "boxes per image, so some objects could never be matched; raise num_queries "
                             f"to at least {len(labels)} (DETR uses 100)")


def _bad_labels(labels: Tensor, num_classes: int) -> Tensor:
    """(n,) labels -> (n,) True where a label is not a class index."""
    return (labels < 0) | (labels >= num_classes)


def _bad_boxes(boxes: Tensor) -> Tensor:
    """(n, 4) boxes -> (n,) True where a box is not normalised (cx, cy, w, h) with w, h > 0."""
    return ~torch.isfinite(boxes).all(1) | ((boxes < 0) | (boxes > 1)).any(1) | (boxes[:, 2:] <= 0).any(1)
