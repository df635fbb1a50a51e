"""DN-DETR (Li et al., 2022): DAB-DETR plus denoising queries, single scale (official ``models/DN_DAB_DETR``).

The diff from :class:`~detr_tutorial.models.DABDETR`:

* the content queries are no longer zeros: every matching query starts from ``label_enc``'s row
  ``num_classes`` (an "unknown" class) followed by an indicator 0 -- ``label_enc`` is an
  ``nn.Embedding(num_classes + 1, d - 1)``;
* in training, ``scalar`` groups of noised copies of the ground truth come first: content
  ``label_enc(noised label)`` followed by an indicator 1, anchor ``inverse_sigmoid(noised box)``; the
  decoder's self-attention mask (:func:`~detr_tutorial.denoising.dn_attention_mask`) keeps the matching
  queries from seeing them and the groups from seeing each other;
* the outputs of the denoising slots are split off (``dn_meta['output_known_lbs_bboxes']``) and
  supervised by :func:`dn_detr_losses` with the objects they were made from, without matching.

Unlike DINO there are no negatives: a group holds one copy of each object (``m`` slots, ``m`` = most
objects in an image), labels are redrawn with probability ``label_noise_scale`` and boxes moved in
(cx, cy, w, h) by less than ``box_noise_scale`` times (w/2, h/2, w, h).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import denoising  # a module, not its names: denoising imports this package (a cycle)
from ..losses import SetCriterion
from ..matcher import check_targets
from .dab_detr import DABDETR, DABTransformer, build_dab_detr
from .backbone import Joiner
from .deformable_transformer import inverse_sigmoid

__all__ = ["DNDETR", "build_dn_detr", "prepare_for_dn", "dn_detr_losses"]


def prepare_for_dn(targets: Sequence[dict[str, Tensor]], scalar: int, label_noise_scale: float,
                   box_noise_scale: float, num_queries: int, num_classes: int, hidden_dim: int,
                   label_enc: nn.Embedding, generator: Optional[torch.Generator] = None
                   ) -> tuple[Tensor, Tensor, Tensor, dict]:
    """DN-DETR's denoising queries (official ``DN_DAB_DETR/dn_components.py`` ``prepare_for_dn``, training).

    Object ``j`` of image ``b`` has its copy of group ``g`` at slot ``g·m + j``. Draws, in the official
    order: label coin flips, replacement labels, box offsets (one uniform per coordinate).

    Returns:
        content (B, pad_size, d) with the indicator 1 in the last channel (0 on padding), anchors
        (B, pad_size, 4) unsigmoided, ``attn_mask`` (T, T) bool with ``T = pad_size + num_queries``, and
        ``dn_meta`` = {``pad_size`` = m·scalar, ``num_dn_group`` = scalar}.
    """
    denoising._check_args(targets, scalar, label_noise_scale, box_noise_scale, num_queries, num_classes, hidden_dim,
                label_enc, label_dim=hidden_dim - 1, dn_name="scalar", noise_name="label_noise_scale")
    counts = [len(t["labels"]) for t in targets]
    labels = torch.cat([t["labels"] for t in targets]).repeat(scalar)  # (scalar·N,)
    boxes = torch.cat([t["boxes"] for t in targets]).repeat(scalar, 1)  # (scalar·N, 4)
    device = boxes.device
    image, _, slot = denoising.copy_slots(counts, scalar, device)

    noisy_labels = denoising.noise_labels(labels, label_noise_scale, num_classes, generator)
    if box_noise_scale > 0:
        spread = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], 1)  # (n, 4): w/2, h/2, w, h
        offset = torch.rand(boxes.shape, generator=generator, dtype=boxes.dtype, device=device) * 2 - 1.0
        boxes = (boxes + offset * spread * box_noise_scale).clamp(min=0.0, max=1.0)

    content = label_enc(noisy_labels)
    content = torch.cat([content, content.new_ones(len(content), 1)], 1)  # indicator 1: a denoising query
    pad_size = max(counts) * scalar
    dn_label = label_enc.weight.new_zeros(len(targets), pad_size, hidden_dim)
    dn_bbox = boxes.new_zeros(len(targets), pad_size, 4)
    dn_label[image, slot] = content
    dn_bbox[image, slot] = inverse_sigmoid(boxes, denoising.INVERSE_SIGMOID_EPS)
    mask = denoising.dn_attention_mask(pad_size, scalar, num_queries, device)
    return dn_label, dn_bbox, mask, {"pad_size": pad_size, "num_dn_group": scalar}


class DNDETR(DABDETR):
    """DN-DAB-DETR: :class:`DABDETR` whose content queries are label embeddings, plus denoising groups in
    training. ``forward(images, mask, targets)`` adds the denoising queries when the model is training
    and ``targets`` are given; the output then carries ``dn_meta``."""

    takes_targets = True  # the Trainer passes the targets in training (the denoising queries are made from them)

    def __init__(self, backbone: Joiner, transformer: DABTransformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, scalar: int = 5, label_noise_scale: float = 0.2,
                 box_noise_scale: float = 0.4) -> None:
        super().__init__(backbone, transformer, num_classes, num_queries, aux_loss)
        self.label_enc = nn.Embedding(num_classes + 1, transformer.d_model - 1)  # one channel left for the indicator
        self.num_classes = num_classes
        self.scalar, self.label_noise_scale, self.box_noise_scale = scalar, label_noise_scale, box_noise_scale

    def forward(self, images: Tensor, mask: Optional[Tensor] = None,
                targets: Optional[Sequence[dict[str, Tensor]]] = None,
                generator: Optional[torch.Generator] = None) -> dict:
        """images (B, 3, H, W), mask (B, H, W) True on padding, targets as :func:`prepare_for_dn` (used only
        in training), generator for the noise (default: the global one) -> ``pred_logits`` (B, Q, K),
        ``pred_boxes`` (B, Q, 4), ``aux_outputs`` and, with denoising, ``dn_meta``."""
        src, mask, _, pos = self._transformer_inputs(images, mask, self.refpoint_embed.weight)
        b, d = src.shape[0], self.transformer.d_model
        unknown = torch.cat([self.label_enc.weight[self.num_classes], src.new_zeros(1)])  # (d,), indicator 0
        tgt = unknown.expand(b, self.num_queries, d)
        anchors = self.refpoint_embed.weight.expand(b, -1, -1)  # (B, Q, 4) unsigmoided
        tgt_mask = dn_meta = None
        if self.training and targets is not None:
            dn_label, dn_bbox, tgt_mask, dn_meta = prepare_for_dn(
                targets, self.scalar, self.label_noise_scale, self.box_noise_scale, self.num_queries,
                self.num_classes, d, self.label_enc, generator)
            tgt, anchors = torch.cat([dn_label, tgt], 1), torch.cat([dn_bbox, anchors], 1)
        hs, references = self.transformer(src, mask, anchors, pos, tgt, tgt_mask)
        boxes = (self.bbox_embed(hs) + inverse_sigmoid(references, self.inverse_sigmoid_eps)).sigmoid()
        logits, boxes = denoising.dn_post_process(self.class_embed(hs), boxes, dn_meta, self.aux_loss)
        out = self._outputs(logits, boxes)
        if dn_meta is not None:
            out["dn_meta"] = dn_meta
        return out


def dn_detr_losses(criterion: SetCriterion, outputs: dict, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """DN-DETR's denoising loss (official ``compute_dn_loss``): every denoising copy is supervised with the
    object it was made from -- focal loss over those slots only (padding is not a background target, unlike
    DINO), L1 and GIoU -- each divided by the number of copies (scalar · #objects). Terms are computed by
    ``criterion`` (focal) on the gathered slots; keys ``tgt_loss_ce``, ``tgt_class_error``,
    ``tgt_loss_bbox``, ``tgt_loss_giou``, suffixed ``_{i}`` for auxiliary layer i; zeros without objects."""
    if not isinstance(criterion, SetCriterion) or criterion.focal_alpha is None:
        raise TypeError("criterion must be a detr_tutorial.losses.SetCriterion with focal_alpha set (DN-DETR: 0.25)")
    if not isinstance(outputs, dict):
        raise TypeError(f"outputs must be the model's output dict, got {type(outputs).__name__}")
    dn_meta = outputs.get("dn_meta")
    suffixes = [""] + [f"_{i}" for i in range(len(outputs.get("aux_outputs", [])))]
    counts = [len(t["labels"]) for t in targets]
    if not dn_meta or "output_known_lbs_bboxes" not in dn_meta or not sum(counts):
        names = ("tgt_loss_ce", "tgt_class_error", "tgt_loss_bbox", "tgt_loss_giou")
        device = outputs["pred_logits"].device if "pred_logits" in outputs else None
        return {name + s: torch.zeros([], device=device) for s in suffixes for name in names}
    known = dn_meta["output_known_lbs_bboxes"]
    check_targets(targets, len(known["pred_logits"]), criterion.num_classes)
    groups = dn_meta["num_dn_group"]
    image, _, slot = denoising.copy_slots(counts, groups, known["pred_logits"].device)
    copies = [{"labels": torch.cat([t["labels"] for t in targets]).repeat(groups),
               "boxes": torch.cat([t["boxes"] for t in targets]).repeat(groups, 1)}]
    every = [(torch.arange(len(slot), device=slot.device),) * 2]  # copy k answers target k
    losses = {}
    for suffix, out in zip(suffixes, [known] + list(known.get("aux_outputs", []))):
        gathered = {k: out[k][image, slot][None] for k in ("pred_logits", "pred_boxes")}  # (1, copies, ·)
        terms = {**criterion.loss_labels(gathered, copies, every, float(len(slot))),
                 **criterion.loss_boxes(gathered, copies, every, float(len(slot)))}
        losses.update({f"tgt_{k}{suffix}": v for k, v in terms.items()})
    return losses


def build_dn_detr(num_classes: int = 91, scalar: int = 5, label_noise_scale: float = 0.2,
                  box_noise_scale: float = 0.4, **dab_options) -> DNDETR:
    """DN-DAB-DETR with the defaults of the official DN-DETR ``main.py -m dn_dab_detr --use_dn``: DAB-DETR's
    (``dab_options`` as :func:`~detr_tutorial.models.build_dab_detr`) plus ``scalar`` 5 groups, label noise
    0.2, box noise 0.4."""
    dab = build_dab_detr(num_classes=num_classes, **dab_options)
    return DNDETR(dab.backbone, dab.transformer, num_classes, dab.num_queries, dab.aux_loss, scalar,
                  label_noise_scale, box_noise_scale)
