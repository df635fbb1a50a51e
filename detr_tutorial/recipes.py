"""Training recipes: each model with the criterion, matcher and post-processing its official code trains with.

``RECIPES`` maps a model name to ``build(num_classes, **model_kwargs) -> (model, criterion, postprocess)``;
:mod:`detr_tutorial.presets` holds the settings (data, schedule, model sizes) and looks models up here.
Two logits conventions exist in the family and each recipe wires one of them throughout:

- softmax (DETR): ``num_classes + 1`` logits, the last one "no object"; :class:`PostProcess`;
- sigmoid/focal (Deformable DETR and every later model): ``num_classes`` logits; :class:`PostProcessTopK`.

The successors of DETR differ from Deformable DETR's recipe only in their coefficients and in how many
detections they keep, so they share :func:`focal_training`. DN-DETR and DINO add a denoising loss without
matching (:class:`DenoisingCriterion`); their models take the targets in training (``takes_targets``).
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from .denoising import dn_losses, dn_weight_dict
from .detr3d_training import build_detr3d_training
from .losses import SetCriterion, num_boxes_per_rank
from .matcher import HungarianMatcher
from .models import build_conditional_detr, build_dab_detr, build_deformable_detr, build_detr, build_dino, build_dn_detr
from .models.dn_detr import dn_detr_losses
from .postprocess import PostProcess, PostProcessTopK

__all__ = ["RECIPES", "DenoisingCriterion", "build_conditional_detr_training", "build_dab_detr_training",
           "build_deformable_detr_training", "build_detr_training", "build_dino_training", "build_dn_detr_training",
           "focal_training", "loss_weights"]


def loss_weights(weights: dict[str, float], num_aux: int, encoder: bool = False) -> dict[str, float]:
    """``weights`` for the last decoder layer, repeated with suffix ``_i`` for the ``num_aux`` earlier layers
    and ``_enc`` for a two-stage encoder's proposals (the official key names)."""
    suffixes = [""] + [f"_{i}" for i in range(num_aux)] + (["_enc"] if encoder else [])
    return {k + suffix: v for suffix in suffixes for k, v in weights.items()}


def _num_aux(model: nn.Module) -> int:
    return model.transformer.decoder.num_layers - 1 if model.aux_loss else 0


def build_detr_training(num_classes: int, cost_class: float = 1, cost_bbox: float = 5, cost_giou: float = 2,
                        eos_coef: float = 0.1, **model_kwargs) -> tuple[nn.Module, nn.Module, Callable]:
    """DETR, its criterion (official weights, auxiliary losses for every decoder layer) and ``PostProcess``.

    All use the softmax convention and the same ``num_classes``.
    ``model_kwargs`` go to :func:`detr_tutorial.models.build_detr`.
    """
    model = build_detr(num_classes=num_classes, **model_kwargs)
    weights = {"loss_ce": cost_class, "loss_bbox": cost_bbox, "loss_giou": cost_giou}
    matcher = HungarianMatcher(num_classes=num_classes, cost_class=cost_class, cost_bbox=cost_bbox,
                               cost_giou=cost_giou)
    criterion = SetCriterion(num_classes, matcher, loss_weights(weights, _num_aux(model)), eos_coef,
                             ["labels", "boxes", "cardinality"])
    return model, criterion, PostProcess(num_classes)


def focal_training(model: nn.Module, num_classes: int, cost_class: float = 2, cost_bbox: float = 5,
                   cost_giou: float = 2, cls_loss_coef: float = 2, focal_alpha: float = 0.25,
                   num_select: int = 100, encoder: bool = False) -> tuple[nn.Module, nn.Module, Callable]:
    """``model`` with a sigmoid-focal matcher (costs ``cost_*``) and criterion (class weight ``cls_loss_coef``,
    box weights ``cost_bbox`` / ``cost_giou``, as every official successor of DETR sets them), auxiliary losses
    for every decoder layer (and ``_enc`` ones when ``encoder``), and ``PostProcessTopK(k=num_select)``."""
    weights = {"loss_ce": cls_loss_coef, "loss_bbox": cost_bbox, "loss_giou": cost_giou}
    matcher = HungarianMatcher(num_classes=num_classes, cost_class=cost_class, cost_bbox=cost_bbox,
                               cost_giou=cost_giou, focal_alpha=focal_alpha)
    criterion = SetCriterion(num_classes, matcher, loss_weights(weights, _num_aux(model), encoder), 0.1,
                             ["labels", "boxes", "cardinality"], focal_alpha=focal_alpha)
    return model, criterion, PostProcessTopK(num_classes, k=num_select)


def build_deformable_detr_training(num_classes: int, cost_class: float = 2, cost_bbox: float = 5,
                                   cost_giou: float = 2, focal_alpha: float = 0.25,
                                   **model_kwargs) -> tuple[nn.Module, nn.Module, Callable]:
    """Deformable DETR with the official coefficients 2 / 5 / 2 (matcher and losses), encoder losses with
    two-stage, top-100 detections. ``model_kwargs`` go to :func:`detr_tutorial.models.build_deformable_detr`."""
    model = build_deformable_detr(num_classes=num_classes, **model_kwargs)
    return focal_training(model, num_classes, cost_class, cost_bbox, cost_giou, cls_loss_coef=cost_class,
                          focal_alpha=focal_alpha, encoder=model.two_stage)


def build_conditional_detr_training(num_classes: int, **model_kwargs) -> tuple[nn.Module, nn.Module, Callable]:
    """Conditional DETR with its ``main.py`` coefficients (costs and losses 2 / 5 / 2, focal alpha 0.25) and
    top-100 detections. ``model_kwargs`` go to :func:`detr_tutorial.models.build_conditional_detr`."""
    return focal_training(build_conditional_detr(num_classes=num_classes, **model_kwargs), num_classes)


def build_dab_detr_training(num_classes: int, **model_kwargs) -> tuple[nn.Module, nn.Module, Callable]:
    """DAB-DETR with its ``main.py`` coefficients: matching costs 2 / 5 / 2 but class loss weight **1**,
    top-300 detections. ``model_kwargs`` go to :func:`detr_tutorial.models.build_dab_detr`."""
    model = build_dab_detr(num_classes=num_classes, **model_kwargs)
    return focal_training(model, num_classes, cls_loss_coef=1, num_select=300)


class DenoisingCriterion(nn.Module):
    """A matching ``criterion`` plus the denoising loss ``dn_loss(criterion, outputs, targets)`` (DN-DETR's
    :func:`~detr_tutorial.models.dn_detr.dn_detr_losses`, DINO's :func:`~detr_tutorial.denoising.dn_losses`)
    and, with ``interm``, DINO's loss on the encoder's selected proposals (``outputs['interm_outputs']``,
    matched to the targets with their classes, suffix ``_interm``; official ``models/dino/dino.py:588-604``).

    ``weight_dict`` is the criterion's plus ``extra_weights`` (the denoising and ``_interm`` terms).
    """

    def __init__(self, criterion: SetCriterion, dn_loss: Callable[..., dict[str, Tensor]],
                 extra_weights: dict[str, float], interm: bool = False) -> None:
        super().__init__()
        if not isinstance(criterion, SetCriterion):
            raise TypeError(f"criterion must be a detr_tutorial.losses.SetCriterion, got {type(criterion).__name__}")
        self.criterion, self.dn_loss, self.interm = criterion, dn_loss, interm
        self.weight_dict = {**criterion.weight_dict, **extra_weights}

    def forward(self, outputs: dict, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``outputs``: the model's (``pred_logits``, ``pred_boxes``, ``aux_outputs``; ``dn_meta`` in training;
        ``interm_outputs`` for DINO); ``targets`` as for :class:`SetCriterion` -> every term, by name."""
        matching = {k: outputs[k] for k in ("pred_logits", "pred_boxes", "aux_outputs") if k in outputs}
        losses = self.criterion(matching, targets)
        losses.update(self.dn_loss(self.criterion, outputs, targets))
        if self.interm:
            num_boxes = num_boxes_per_rank(targets, outputs["pred_logits"].device)  # as the matching terms'
            losses.update(self.criterion._suffixed(outputs["interm_outputs"], targets, num_boxes, "_interm"))
        missing = sorted(set(self.weight_dict) - set(losses))
        if missing:
            raise ValueError(f"weight_dict names {missing}, which these outputs do not produce")
        return losses


def build_dn_detr_training(num_classes: int, **model_kwargs) -> tuple[nn.Module, nn.Module, Callable]:
    """DN-DETR: DAB-DETR's recipe (:func:`build_dab_detr_training`) plus the denoising terms ``tgt_loss_*``
    weighted as their matching counterparts (official ``DN_DAB_DETR/DABDETR.py:508-524``).
    ``model_kwargs`` go to :func:`detr_tutorial.models.build_dn_detr`."""
    model = build_dn_detr(num_classes=num_classes, **model_kwargs)
    model, criterion, postprocess = focal_training(model, num_classes, cls_loss_coef=1, num_select=300)
    dn_weights = {f"tgt_{k}": v for k, v in criterion.weight_dict.items()}
    return model, DenoisingCriterion(criterion, dn_detr_losses, dn_weights), postprocess


def build_dino_training(num_classes: int, **model_kwargs) -> tuple[nn.Module, nn.Module, Callable]:
    """DINO with its ``config/DINO/DINO_4scale.py`` coefficients: matching costs 2 / 5 / 2, losses 1 / 5 / 2 for
    the matching queries, the denoising ones (``_dn``) and the selected encoder proposals (``_interm``), focal
    alpha 0.25, top-300 detections (``dino.py:757-806``). ``model_kwargs`` go to
    :func:`detr_tutorial.models.build_dino`."""
    model = build_dino(num_classes=num_classes, **model_kwargs)
    model, criterion, postprocess = focal_training(model, num_classes, cls_loss_coef=1, num_select=300)
    main = {k: v for k, v in criterion.weight_dict.items() if k in ("loss_ce", "loss_bbox", "loss_giou")}
    extra = {**dn_weight_dict(criterion.weight_dict), **{f"{k}_interm": v for k, v in main.items()}}
    return model, DenoisingCriterion(criterion, dn_losses, extra, interm=True), postprocess


#: model name -> ``build(num_classes, **kwargs) -> (model, criterion, postprocess)``.
RECIPES: dict[str, Callable[..., tuple[nn.Module, nn.Module, Callable]]] = {
    "detr": build_detr_training,
    "deformable_detr": build_deformable_detr_training,
    "conditional_detr": build_conditional_detr_training,
    "dab_detr": build_dab_detr_training,
    "dn_detr": build_dn_detr_training,
    "dino": build_dino_training,
    "detr3d": build_detr3d_training,
}
