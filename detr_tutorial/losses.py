"""The set criterion: DETR's loss once predictions are matched to targets.

Two steps (Carion et al., 2020):

1. a :class:`~detr_tutorial.matcher.HungarianMatcher` pairs each target with
   one prediction;
2. each pair is supervised for its class and its box, and every unmatched
   prediction is supervised to say "no object".

The terms, with the official key names:

* ``loss_ce`` -- cross-entropy over K+1 classes for all B*Q queries, the
  "no object" class weighted by ``eos_coef`` (0.1) because most queries are
  empty. With ``focal_alpha`` set (Deformable DETR, Zhu et al., 2021) it is
  instead the sigmoid focal loss (Lin et al., 2017) over K per-class logits,
  summed and divided by the number of target boxes.
* ``loss_bbox`` -- L1 distance of matched (cx, cy, w, h) boxes, summed over
  coordinates and pairs, divided by the number of target boxes.
* ``loss_giou`` -- ``1 - GIoU`` of matched boxes, divided likewise.
* ``class_error`` (logged) -- 100 minus the top-1 accuracy of matched queries.
* ``cardinality_error`` (logged, no gradient) -- mean absolute error between
  the number of predictions that are not "no object" and the number of targets.

With ``outputs["aux_outputs"]`` (one dict per intermediate decoder layer) every
term except the logged ``class_error`` is repeated per layer with its own
matching, suffixed ``_0``, ``_1``, ...; with ``outputs["enc_outputs"]``
(two-stage Deformable DETR) once more against class-agnostic targets (all
labels 0), suffixed ``_enc``.

The criterion and its matcher must agree on ``num_classes`` and on the logits
convention (softmax with "no object", or sigmoid/focal); ``weight_dict`` may
only name trained terms (``loss_ce``, ``loss_bbox``, ``loss_giou`` of the
requested ``losses``, bare or suffixed), so a misspelt key is an error instead
of a term that is computed, logged and never trained. Matching and losses are
computed in float32 whatever the model's dtype (float64 stays float64).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .distributed import is_distributed, mean_over_ranks
from .matcher import HungarianMatcher, check_outputs, check_targets

__all__ = ["SetCriterion", "sigmoid_focal_loss", "accuracy", "num_boxes_per_rank"]

Indices = list[tuple[Tensor, Tensor]]
_LOSSES = ("labels", "boxes", "cardinality")
#: the trained (weightable) terms of each loss; class_error and cardinality_error are only logged
_TRAINED = {"labels": ("loss_ce",), "boxes": ("loss_bbox", "loss_giou"), "cardinality": ()}
_SUFFIX = re.compile(r"^(?P<base>.+?)(?P<suffix>_\d+|_enc)?$")


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_boxes: float,
                       alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss on (B, Q, K) logits and (B, Q, K) 0/1 targets, reduced as
    Deformable DETR does: averaged over queries, summed, divided by
    ``num_boxes``. Per element it is ``torchvision.ops.sigmoid_focal_loss``:
    ``alpha_t * (1 - p_t) ** gamma * BCE(p, y)``.
    """
    if inputs.dim() < 2 or inputs.shape != targets.shape:
        raise ValueError(f"inputs and targets must have the same shape (B, Q, ...), "
                         f"got {tuple(inputs.shape)} and {tuple(targets.shape)}")
    loss = torchvision.ops.sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean(1).sum() / num_boxes


@torch.no_grad()
def accuracy(output: Tensor, target: Tensor) -> Tensor:
    """Top-1 accuracy in percent of (M, C) scores against (M,) labels; 0 when M == 0."""
    if target.numel() == 0:
        return torch.zeros([], device=output.device)
    return (output.argmax(-1) == target).float().sum() * (100.0 / target.numel())


def num_boxes_per_rank(targets: Sequence[dict[str, Tensor]], device: torch.device | str | None = None) -> float:
    """The normaliser of the box and class losses: the number of target boxes in the batch, at least 1.

    Under DDP, which averages gradients over ranks, it is the mean number per rank (then clamped to 1), as
    the official DETR, Deformable DETR and DINO compute ``num_boxes``; one process gives the batch's count.
    """
    count = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    return torch.clamp(mean_over_ranks(count), min=1).item()


class SetCriterion(nn.Module):
    """DETR's (or, with ``focal_alpha``, Deformable DETR's) set loss.

    Args:
        num_classes: number of object classes K, without "no object".
        matcher: a :class:`~detr_tutorial.matcher.HungarianMatcher` with the same
            ``num_classes`` and the same convention (its ``focal_alpha`` is None
            exactly when this criterion's is).
        weight_dict: loss name -> weight. Kept for the training loop, which sums
            ``weight_dict[k] * losses[k]``; the criterion itself returns unweighted terms.
            Keys are trained terms of ``losses`` (``loss_ce``, ``loss_bbox``, ``loss_giou``),
            optionally suffixed ``_0``, ``_1``, ... (auxiliary decoder layers) or ``_enc``;
            anything else raises ``ValueError``, and so does, in :meth:`forward`, a key
            whose term the outputs do not produce.
        eos_coef: weight of the "no object" class in the cross-entropy (0.1);
            stored in the ``empty_weight`` buffer (K+1,). Unused by the focal loss.
        losses: which terms to compute, from ``"labels"``, ``"boxes"``, ``"cardinality"``.
        focal_alpha: ``None`` for softmax cross-entropy over (B, Q, K+1) logits;
            a number (0.25) for the sigmoid focal loss over (B, Q, K) logits.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float, losses: Sequence[str], focal_alpha: float | None = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int (object classes, without 'no object'), "
                             f"got {num_classes!r}")
        if isinstance(eos_coef, bool) or not isinstance(eos_coef, (int, float)) or not 0 <= eos_coef <= 1:
            raise ValueError(f"eos_coef must be a number in [0, 1], got {eos_coef!r}")
        unknown = [loss for loss in losses if loss not in _LOSSES]
        if isinstance(losses, str) or unknown:
            raise ValueError(f"losses must be a list drawn from {list(_LOSSES)}, got {losses!r}")
        if focal_alpha is not None and (isinstance(focal_alpha, bool) or not isinstance(focal_alpha, (int, float))):
            raise ValueError(f"focal_alpha must be None or a number (0.25 in Deformable DETR), got {focal_alpha!r}")
        _check_matcher(matcher, num_classes, focal_alpha is not None)
        _check_weight_dict(weight_dict, losses)
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.focal_alpha = focal_alpha
        empty_weight = torch.ones(num_classes + 1)  # (K+1,)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs: dict, targets: Sequence[dict], indices: Indices, num_boxes: float,
                    log: bool = True) -> dict[str, Tensor]:
        """``loss_ce`` (and, if ``log``, ``class_error``)."""
        src_logits = outputs["pred_logits"]  # (B, Q, K+1), or (B, Q, K) for focal
        idx = _src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])  # (M,)
        # Every query is "no object" (class K) unless it was matched.
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)  # (B, Q)
        target_classes[idx] = target_classes_o

        if self.focal_alpha is None:
            loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        else:
            # One-hot over K+1 classes, then drop "no object": an empty query has all-zero targets.
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(src_logits.dtype)  # (B, Q, K)
            loss_ce = sigmoid_focal_loss(src_logits, onehot, num_boxes, alpha=self.focal_alpha, gamma=2.0)
            loss_ce = loss_ce * src_logits.shape[1]  # undo the mean over queries
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = 100 - accuracy(src_logits[idx], target_classes_o)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: Sequence[dict], indices: Indices,
                         num_boxes: float) -> dict[str, Tensor]:
        """``cardinality_error``: |#predictions whose argmax is not the last class - #targets|,
        averaged over images. A logged diagnostic, not a loss (no gradient). As in
        the official Deformable DETR, focal logits are treated the same way."""
        pred_logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=pred_logits.device)  # (B,)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)  # (B,)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs: dict, targets: Sequence[dict], indices: Indices,
                   num_boxes: float) -> dict[str, Tensor]:
        """``loss_bbox`` (L1) and ``loss_giou`` over matched pairs, each divided by ``num_boxes``."""
        idx = _src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]  # (M, 4)
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes.dtype)  # (M, 4)

        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")  # (M, 4)
        loss_giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes),
                                                       box_cxcywh_to_xyxy(target_boxes)))  # (M,)
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def get_loss(self, loss: str, outputs: dict, targets: Sequence[dict], indices: Indices,
                 num_boxes: float, **kwargs) -> dict[str, Tensor]:
        loss_map = {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes}
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    def forward(self, outputs: dict, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Compute all requested terms.

        Args:
            outputs: ``pred_logits`` (B, Q, K+1) -- (B, Q, K) with ``focal_alpha`` --,
                ``pred_boxes`` (B, Q, 4) normalised (cx, cy, w, h); optionally
                ``aux_outputs`` (list of such dicts) and ``enc_outputs`` (one such dict).
            targets: B dicts with ``labels`` (n_i,) int64 and ``boxes`` (n_i, 4).

        Returns:
            dict of scalar tensors, keys as listed in the module docstring.
        """
        main = _float32({k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}, "outputs")
        aux_outputs = [_float32(aux, f"outputs['aux_outputs'][{i}]")
                       for i, aux in enumerate(outputs.get("aux_outputs", []))]
        enc = _float32(outputs["enc_outputs"], "outputs['enc_outputs']") if "enc_outputs" in outputs else None
        self._check_outputs(main, None, "outputs")
        for i, aux in enumerate(aux_outputs):
            self._check_outputs(aux, len(main["pred_logits"]), f"outputs['aux_outputs'][{i}]")
        if enc is not None:
            self._check_outputs(enc, len(main["pred_logits"]), "outputs['enc_outputs']")
        # The targets are validated once per batch (not once per decoder layer); the matcher then skips it.
        layers = [main, *aux_outputs] + ([enc] if enc is not None else [])
        num_queries = min(out["pred_logits"].shape[1] for out in layers)
        check_targets(targets, len(main["pred_logits"]), self.num_classes, num_queries)
        indices = self.matcher.match(main, targets)

        num_boxes = num_boxes_per_rank(targets, main["pred_logits"].device)

        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, main, targets, indices, num_boxes))

        # Intermediate decoder layers: same terms, their own matching, no class_error.
        for i, aux in enumerate(aux_outputs):
            losses.update(self._suffixed(aux, targets, num_boxes, f"_{i}"))

        # Two-stage encoder proposals: class-agnostic, every object is class 0.
        if enc is not None:
            bin_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._suffixed(enc, bin_targets, num_boxes, "_enc"))

        if self.focal_alpha is None and is_distributed():
            losses = self._global_cross_entropy(losses, targets, main["pred_logits"].shape[1])
        missing = sorted(set(self.weight_dict) - set(losses))
        if missing:
            raise ValueError(f"weight_dict names {missing}, which these outputs do not produce (computed: "
                             f"{sorted(losses)}); check the number of decoder layers and two-stage settings")
        return losses

    def _global_cross_entropy(self, losses: dict[str, Tensor], targets: Sequence[dict],
                              num_queries: int) -> dict[str, Tensor]:
        """Under DDP, which averages gradients over ranks: every ``loss_ce*`` rescaled from this rank's weighted
        mean to its share of the global batch's, i.e. divided by the mean weight sum per rank instead of its own
        (the official DETR keeps the per-rank mean). Every target is matched in every layer, so the weight sum of
        a layer is that of all queries "no object" plus, per target, its class weight minus that of "no object"."""
        no_object = self.empty_weight[-1]
        weight = sum(no_object * num_queries + (self.empty_weight[t["labels"]] - no_object).sum() for t in targets)
        factor = weight / mean_over_ranks(weight)
        return {k: v * factor if k == "loss_ce" or k.startswith("loss_ce_") else v for k, v in losses.items()}

    def _suffixed(self, outputs: dict, targets: Sequence[dict], num_boxes: float, suffix: str) -> dict[str, Tensor]:
        indices = self.matcher.match(outputs, targets)
        losses = {}
        for loss in self.losses:
            kwargs = {"log": False} if loss == "labels" else {}
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes, **kwargs))
        return {k + suffix: v for k, v in losses.items()}

    def _check_outputs(self, outputs: dict, batch_size: int | None, name: str) -> None:
        try:
            check_outputs(outputs, self.num_classes, focal=self.focal_alpha is not None)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        if batch_size is not None and outputs["pred_logits"].shape[0] != batch_size:
            raise ValueError(f"{name} holds {outputs['pred_logits'].shape[0]} images, the main outputs {batch_size}")


def _float32(outputs: dict, name: str) -> dict:
    """``outputs`` with half-precision ``pred_logits`` / ``pred_boxes`` cast to float32 (differentiably):
    cdist has no float16 kernel on CPU and float16 box areas overflow above 65,504."""
    if not isinstance(outputs, dict):
        raise TypeError(f"{name} must be a dict with 'pred_logits' and 'pred_boxes', got {type(outputs).__name__}")
    return {k: v.float() if isinstance(v, Tensor) and v.dtype in (torch.float16, torch.bfloat16) else v
            for k, v in outputs.items()}


def _check_matcher(matcher: HungarianMatcher, num_classes: int, focal: bool) -> None:
    if not isinstance(matcher, HungarianMatcher):
        raise TypeError(f"matcher must be a detr_tutorial.matcher.HungarianMatcher, got {type(matcher).__name__}")
    if matcher.focal != focal:
        mine, theirs = ("sigmoid/focal", "softmax") if focal else ("softmax", "sigmoid/focal")
        raise ValueError(f"the criterion uses the {mine} convention (focal_alpha={'set' if focal else 'None'}) but "
                         f"the matcher the {theirs} one (focal_alpha={matcher.focal_alpha}); build both with the "
                         "same focal_alpha setting")
    if matcher.num_classes != num_classes:
        raise ValueError(f"the criterion has num_classes={num_classes} but the matcher "
                         f"num_classes={matcher.num_classes}")


def _check_weight_dict(weight_dict: dict, losses: Sequence[str]) -> None:
    if not isinstance(weight_dict, dict):
        raise TypeError(f"weight_dict must be a dict of loss name -> weight, got {type(weight_dict).__name__}")
    trained = [term for loss in losses for term in _TRAINED[loss]]
    unknown = [k for k in weight_dict if not isinstance(k, str) or _SUFFIX.match(k)["base"] not in trained]
    if unknown:
        raise ValueError(f"weight_dict has unknown keys {unknown}: with losses={list(losses)} a key must be one of "
                         f"{trained}, optionally suffixed _0, _1, ... (auxiliary layers) or _enc (two-stage)")


def _src_permutation_idx(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx), each (M,): where the matched predictions sit in (B, Q)."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx
