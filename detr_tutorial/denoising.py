"""Contrastive denoising queries: DINO's ``prepare_for_cdn``, ``dn_post_process`` and the loss without matching.

DN-DETR (Li et al., 2022) adds to the decoder extra queries built from noised ground-truth
boxes and labels; each one must reconstruct the object it was made from, so its target is known
and no matching is needed. DINO (Zhang et al., 2022) makes the denoising *contrastive*: every
group holds a positive copy of each object (small noise, to be reconstructed) and a negative copy
(larger noise, to be classified as background).

Layout (official ``models/dino/dn_components.py``; ``m`` = most objects in an image of the batch,
``G`` = number of groups): the ``pad_size = 2·m·G`` denoising slots come first, then the
``num_queries`` matching queries. Object ``j`` of image ``b`` has its positive copy of group ``g``
at slot ``2·g·m + j`` and its negative copy at ``(2·g + 1)·m + j``; images with fewer than ``m``
objects leave padding slots (zero content, zero unsigmoided box) that nothing supervises as an
object. The self-attention mask (True = blocked) keeps the matching queries from seeing any
denoising slot (they would see the answers) and each group from seeing the others.

The random draws are made in the official order -- label coin flips, replacement labels, box
signs, box magnitudes -- from ``generator`` (or the global generator), so with the same seed the
noised queries equal the official ones exactly.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .losses import _TRAINED, SetCriterion, num_boxes_per_rank
from .matcher import check_targets
from .models.deformable_transformer import inverse_sigmoid

__all__ = ["num_dn_groups", "noise_labels", "noise_boxes", "dn_attention_mask", "copy_slots", "prepare_for_cdn",
           "dn_post_process", "dn_positive_indices", "dn_losses", "dn_weight_dict"]

#: DN-DETR, DAB-DETR and DINO clamp ``inverse_sigmoid`` at 1e-3 (their ``util/misc.py``), not 1e-5.
INVERSE_SIGMOID_EPS = 1e-3


def num_dn_groups(dn_number: int, max_objects: int) -> int:
    """Number of denoising groups ``G`` (each a positive and a negative copy of every object), exactly as
    the official code computes it: with ``2·dn_number >= 100`` the budget of ``2·dn_number`` queries is
    shared, ``G = 2·dn_number // (2·max_objects)`` (DINO's 100 -> ``100 // m``), and at least 1; a smaller
    ``dn_number`` is *not* divided (5 gives 10 groups whatever ``m``); no objects, or ``dn_number == 0``,
    give 1 group."""
    doubled = 2 * dn_number
    if max_objects == 0 or doubled < 1:
        return 1
    if doubled >= 100:
        return max(doubled // (2 * max_objects), 1)
    return doubled


def noise_labels(labels: Tensor, probability: float, num_classes: int,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """(n,) labels with each one replaced, with ``probability`` (DINO: half its ``label_noise_ratio``;
    DN-DETR: its ``label_noise_scale``), by a class drawn uniformly from [0, num_classes) (possibly the
    same). Draws n uniforms, then one class per replaced label."""
    noisy = labels.clone()
    if probability > 0:
        p = torch.rand(labels.shape, generator=generator, device=labels.device)
        chosen = torch.nonzero(p < probability).view(-1)
        noisy.scatter_(0, chosen, torch.randint(0, num_classes, chosen.shape, generator=generator,
                                                device=labels.device))
    return noisy


def noise_boxes(boxes: Tensor, negative: Tensor, box_noise_scale: float,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """(n, 4) cxcywh boxes with every corner moved independently: x by ``±r·w/2·box_noise_scale``, y by
    ``±r·h/2·box_noise_scale`` with ``r`` in [0, 1) for positives and [1, 2) where ``negative`` (n,) is
    True; clamped to [0, 1]. Draws the (n, 4) signs, then the (n, 4) magnitudes."""
    if box_noise_scale <= 0:
        return boxes.clone()
    xyxy = box_cxcywh_to_xyxy(boxes)
    half = boxes[:, 2:].repeat(1, 2) / 2  # (n, 4): w/2, h/2, w/2, h/2
    sign = torch.randint(0, 2, boxes.shape, generator=generator, dtype=boxes.dtype, device=boxes.device) * 2.0 - 1.0
    part = torch.rand(boxes.shape, generator=generator, dtype=boxes.dtype, device=boxes.device)
    part[negative] += 1.0
    xyxy = (xyxy + part * sign * half * box_noise_scale).clamp(min=0.0, max=1.0)
    return box_xyxy_to_cxcywh(xyxy)


def dn_attention_mask(pad_size: int, num_groups: int, num_queries: int,
                      device: Optional[torch.device] = None) -> Tensor:
    """(T, T) bool self-attention mask, ``T = pad_size + num_queries``, True = blocked: matching queries
    (rows ``pad_size:``) see no denoising slot; a denoising slot sees its own group (DINO: positives and
    negatives; groups of ``pad_size // num_groups`` slots) and every matching query, but no other group."""
    if num_groups < 1 or pad_size % num_groups:
        raise ValueError(f"pad_size ({pad_size}) must be a multiple of num_groups ({num_groups}) >= 1")
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    if pad_size:
        group = torch.arange(pad_size, device=device) // (pad_size // num_groups)  # (pad_size,)
        mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return mask


def copy_slots(counts: Sequence[int], chunks: int, device: Optional[torch.device] = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Where the copies of the objects go: the objects of all images (``counts[b]`` in image b, N in all)
    repeated ``chunks`` times, chunk-major -> (chunks·N,) image index, chunk index, and slot
    ``chunk·m + j`` (object j of its image, ``m = max(counts)``)."""
    m, n = max(counts), sum(counts)
    image = torch.cat([torch.full((c,), b, device=device) for b, c in enumerate(counts)]).repeat(chunks)
    chunk = torch.arange(chunks, device=device).repeat_interleave(n)
    within = torch.cat([torch.arange(c, device=device) for c in counts]).repeat(chunks)
    return image, chunk, chunk * m + within


def prepare_for_cdn(targets: Sequence[dict[str, Tensor]], dn_number: int, label_noise_ratio: float,
                    box_noise_scale: float, num_queries: int, num_classes: int, hidden_dim: int,
                    label_enc: nn.Embedding, generator: Optional[torch.Generator] = None
                    ) -> tuple[Tensor, Tensor, Tensor, dict]:
    """DINO's contrastive denoising queries for one training batch (official ``prepare_for_cdn``).

    Args:
        targets: B dicts with ``labels`` (n_b,) int64 in [0, num_classes) and ``boxes`` (n_b, 4)
            normalised (cx, cy, w, h).
        dn_number: the denoising budget (DINO: 100); see :func:`num_dn_groups`.
        label_noise_ratio: twice the probability that a copy's label is redrawn (DINO: 0.5).
        box_noise_scale: λ of :func:`noise_boxes` (DINO's config 0.4, its training scripts 1.0).
        num_queries: matching queries that follow the denoising slots (DINO: 900).
        num_classes: replacement labels are drawn from [0, num_classes).
        hidden_dim: d, the width of ``label_enc``'s embeddings.
        label_enc: embedding with at least ``num_classes`` rows (DINO: 92 = dn_labelbook_size + 1).
        generator: source of the random draws (default: the global generator, as the official code).

    Returns:
        ``input_query_label`` (B, pad_size, d), ``input_query_bbox`` (B, pad_size, 4) unsigmoided
        (``inverse_sigmoid`` with eps 1e-3), ``attn_mask`` (T, T) bool, True = blocked, and
        ``dn_meta`` = {``pad_size``, ``num_dn_group``}. A batch without objects gives ``pad_size`` 0,
        one group, and an all-False mask over the matching queries.
    """
    _check_args(targets, dn_number, label_noise_ratio, box_noise_scale, num_queries, num_classes,
                hidden_dim, label_enc)
    counts = [len(t["labels"]) for t in targets]
    m = max(counts)
    groups = num_dn_groups(dn_number, m)
    pad_size = 2 * m * groups
    labels = torch.cat([t["labels"] for t in targets]).repeat(2 * groups)  # (2G·N,)
    boxes = torch.cat([t["boxes"] for t in targets]).repeat(2 * groups, 1)  # (2G·N, 4)
    device = boxes.device
    # copy k belongs to chunk k // N (even: positive, odd: negative of group chunk // 2)
    image, chunk, slot = copy_slots(counts, 2 * groups, device)

    noisy_labels = noise_labels(labels, label_noise_ratio * 0.5, num_classes, generator)
    noisy_boxes = noise_boxes(boxes, chunk % 2 == 1, box_noise_scale, generator)

    weight = label_enc.weight
    input_query_label = weight.new_zeros(len(targets), pad_size, hidden_dim)
    input_query_bbox = boxes.new_zeros(len(targets), pad_size, 4)
    input_query_label[image, slot] = label_enc(noisy_labels)
    input_query_bbox[image, slot] = inverse_sigmoid(noisy_boxes, INVERSE_SIGMOID_EPS)
    attn_mask = dn_attention_mask(pad_size, groups, num_queries, device)
    return input_query_label, input_query_bbox, attn_mask, {"pad_size": pad_size, "num_dn_group": groups}


def dn_post_process(outputs_class: Tensor, outputs_coord: Tensor, dn_meta: Optional[dict],
                    aux_loss: bool) -> tuple[Tensor, Tensor]:
    """Split per-layer outputs (L, B, pad_size + Q, ·) into the denoising part and the matching part.

    The denoising part goes into ``dn_meta['output_known_lbs_bboxes']`` as an output dict (last layer's
    ``pred_logits``/``pred_boxes``, earlier layers as ``aux_outputs`` when ``aux_loss``), as the official
    code does; returned are the matching parts (L, B, Q, ·). Without denoising slots (``dn_meta`` None or
    ``pad_size`` 0) the outputs are returned unchanged and ``dn_meta`` is left as it is."""
    if not dn_meta or dn_meta["pad_size"] == 0:
        return outputs_class, outputs_coord
    pad = dn_meta["pad_size"]
    if outputs_class.dim() != 4 or outputs_coord.shape[:3] != outputs_class.shape[:3] or \
            outputs_class.shape[2] <= pad:
        raise ValueError(f"outputs_class and outputs_coord must be (L, B, pad_size + Q, ·) with pad_size={pad} "
                         f"and Q >= 1, got {tuple(outputs_class.shape)} and {tuple(outputs_coord.shape)}")
    known_class, known_coord = outputs_class[:, :, :pad], outputs_coord[:, :, :pad]
    known = {"pred_logits": known_class[-1], "pred_boxes": known_coord[-1]}
    if aux_loss:
        known["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(known_class[:-1], known_coord[:-1])]
    dn_meta["output_known_lbs_bboxes"] = known
    return outputs_class[:, :, pad:], outputs_coord[:, :, pad:]


def dn_positive_indices(targets: Sequence[dict[str, Tensor]], dn_meta: dict) -> list[tuple[Tensor, Tensor]]:
    """Which target each positive denoising slot answers, in the matcher's format: per image
    (slot indices, target indices), each (G·n_b,), group-major: slot ``g·2m + j`` answers object ``j``.
    Negatives and padding slots appear nowhere, so the focal loss treats them as background."""
    groups, pad_size = dn_meta["num_dn_group"], dn_meta["pad_size"]
    if pad_size % groups:
        raise ValueError(f"dn_meta['pad_size'] ({pad_size}) must be a multiple of num_dn_group ({groups})")
    group_size = pad_size // groups
    indices = []
    for t in targets:
        device = t["labels"].device
        tgt = torch.arange(len(t["labels"]), device=device).repeat(groups)  # (G·n,)
        offset = (torch.arange(groups, device=device) * group_size).repeat_interleave(len(t["labels"]))
        indices.append((offset + tgt, tgt))
    return indices


def dn_losses(criterion: SetCriterion, outputs: dict, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """DINO's denoising loss (official ``SetCriterion.forward``, "prepare for dn loss"): the criterion's
    terms on ``outputs['dn_meta']['output_known_lbs_bboxes']`` with the fixed assignment of
    :func:`dn_positive_indices` instead of a matching, normalised by ``max(#objects, 1) · G``
    (#objects: the mean per rank under DDP, as the matching terms').

    Args:
        criterion: the focal :class:`~detr_tutorial.losses.SetCriterion` of the matching queries.
        outputs: the model's outputs, with ``dn_meta`` (after :func:`dn_post_process`) and, if the model
            has auxiliary layers, ``aux_outputs``.
        targets: B dicts with ``labels`` (n_b,) and ``boxes`` (n_b, 4), those given to :func:`prepare_for_cdn`.

    Returns:
        The criterion's terms suffixed ``_dn`` (last layer) and ``_dn_{i}`` (auxiliary layer i), e.g.
        ``loss_ce_dn``, ``loss_bbox_dn``, ``loss_giou_dn``, ``cardinality_error_dn``; no ``class_error``.
        Without denoising outputs (a batch with no objects) the same keys hold zeros, as in the official code.
    """
    if not isinstance(criterion, SetCriterion):
        raise TypeError(f"criterion must be a detr_tutorial.losses.SetCriterion, got {type(criterion).__name__}")
    if not isinstance(outputs, dict) or "dn_meta" not in outputs:
        raise ValueError("outputs must be the model's output dict with a 'dn_meta' entry")
    dn_meta = outputs["dn_meta"]
    suffixes = ["_dn"] + [f"_dn_{i}" for i in range(len(outputs.get("aux_outputs", [])))]
    if not dn_meta or "output_known_lbs_bboxes" not in dn_meta:
        names = [term for loss in criterion.losses for term in _TRAINED[loss]]
        names += ["cardinality_error"] if "cardinality" in criterion.losses else []
        device = targets[0]["labels"].device if targets else None
        return {name + s: torch.zeros([], device=device) for s in suffixes for name in names}
    known = dn_meta["output_known_lbs_bboxes"]
    layers = [known] + list(known.get("aux_outputs", []))
    if len(layers) != len(suffixes):
        raise ValueError(f"the denoising outputs hold {len(layers)} layers but the matching outputs "
                         f"{len(suffixes)}; run dn_post_process with the model's aux_loss")
    check_targets(targets, len(known["pred_logits"]), criterion.num_classes)
    indices = dn_positive_indices(targets, dn_meta)
    # official ``num_boxes * scalar``: the matching terms' normaliser (the mean per rank under DDP) times G
    num_boxes = num_boxes_per_rank(targets, known["pred_logits"].device) * dn_meta["num_dn_group"]
    losses = {}
    for suffix, out in zip(suffixes, layers):
        for loss in criterion.losses:
            kwargs = {"log": False} if loss == "labels" else {}
            terms = criterion.get_loss(loss, out, targets, indices, float(num_boxes), **kwargs)
            losses.update({k + suffix: v for k, v in terms.items()})
    return losses


def dn_weight_dict(weight_dict: dict[str, float]) -> dict[str, float]:
    """The weights of the :func:`dn_losses` terms: each matching term's weight under its ``_dn`` name
    (``loss_ce`` -> ``loss_ce_dn``, ``loss_bbox_3`` -> ``loss_bbox_dn_3``), as DINO's ``build_dino`` sets
    them (``dino.py:770-785``); encoder terms (``_enc``) have no denoising counterpart."""
    if not isinstance(weight_dict, dict):
        raise TypeError(f"weight_dict must be a dict of loss name -> weight, got {type(weight_dict).__name__}")
    out = {}
    for key, weight in weight_dict.items():
        match = re.fullmatch(r"(?P<base>loss_[a-z]+)(?P<layer>_\d+)?", key)
        if match:
            out[f"{match['base']}_dn{match['layer'] or ''}"] = weight
    return out


def _check_args(targets, dn_number, label_noise_ratio, box_noise_scale, num_queries, num_classes,
                hidden_dim, label_enc, label_dim: Optional[int] = None, dn_name: str = "dn_number",
                noise_name: str = "label_noise_ratio") -> None:
    """Raise on bad :func:`prepare_for_cdn` arguments; ``label_enc`` must embed in ``label_dim``
    (default ``hidden_dim``) channels."""
    label_dim = hidden_dim if label_dim is None else label_dim
    for name, value, low in ((dn_name, dn_number, 0 if dn_name == "dn_number" else 1), ("num_queries", num_queries, 1),
                             ("num_classes", num_classes, 1), ("hidden_dim", hidden_dim, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(label_noise_ratio, bool) or not isinstance(label_noise_ratio, (int, float)) \
            or not 0 <= label_noise_ratio <= 1:
        raise ValueError(f"{noise_name} must be a number in [0, 1], got {label_noise_ratio!r}")
    if isinstance(box_noise_scale, bool) or not isinstance(box_noise_scale, (int, float)) or not box_noise_scale >= 0:
        raise ValueError(f"box_noise_scale must be a number >= 0 (DINO: 0.4 or 1.0), got {box_noise_scale!r}")
    if not isinstance(label_enc, nn.Embedding):
        raise TypeError(f"label_enc must be an nn.Embedding, got {type(label_enc).__name__}")
    if label_enc.embedding_dim != label_dim or label_enc.num_embeddings < num_classes:
        raise ValueError(f"label_enc must embed at least num_classes={num_classes} labels in {label_dim} "
                         f"channels, got nn.Embedding({label_enc.num_embeddings}, {label_enc.embedding_dim})")
    if isinstance(targets, (list, tuple)) and not targets:
        raise ValueError("targets must hold one dict per image, got an empty batch")
    check_targets(targets, len(targets) if isinstance(targets, (list, tuple)) else -1, num_classes)
