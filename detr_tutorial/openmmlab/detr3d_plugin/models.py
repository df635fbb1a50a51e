"""DETR3D's config types -> the library's mini DETR3D (:mod:`detr_tutorial.models.detr3d`).

==========================  =========================================================  ===============================
type                        file in WangYueFt/detr3d ``projects/mmdet3d_plugin/``      what it builds here
==========================  =========================================================  ===============================
``Detr3D``                  ``models/detectors/detr3d.py``                             :class:`MultiViewDetector`
``Detr3DHead``              ``models/dense_heads/detr3d_head.py``                      :class:`SetPredictionHead`
``HungarianAssigner3D``     ``core/bbox/assigners/hungarian_assigner_3d.py``           the library's assigner
``NMSFreeCoder``            ``core/bbox/coders/nms_free_coder.py``                     the library's coder
==========================  =========================================================  ===============================

The official head carries the decoder's settings too (``transformer`` -> ``Detr3DTransformer`` ->
``Detr3DTransformerDecoder`` -> ``DetrTransformerDecoderLayer`` with ``attn_cfgs`` ``[MultiheadAttention,
Detr3DCrossAtten]``): :func:`Detr3D` reads them into :class:`~detr_tutorial.models.DETR3D`'s arguments and builds
the head from the rest (losses, coder, ``train_cfg.pts.assigner``). The backbone is built first and the model
next, as :func:`~detr_tutorial.models.build_detr3d` does; the neck is built aside and takes the model's input
projection weights, so a config-built model starts from the builder's weights, seed for seed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ...detr3d_training import Detr3DCriterion
from ...detr3d_training import HungarianAssigner3D as _Assigner
from ...detr3d_training import NMSFreeCoder as _Coder
from ...models.detr3d import DETR3D
from ..detectors import Detector, SetPredictionHead, _loss_weight
from ..registry import MODELS

__all__ = ["Detr3D", "Detr3DHead", "HungarianAssigner3D", "MultiViewDetector", "NMSFreeCoder"]

#: the official decoder layer's order; the library's layer is built for it alone
OPERATION_ORDER = ("self_attn", "norm", "cross_attn", "norm", "ffn", "norm")


def _cost(cost: Optional[dict], kind: str) -> float:
    cost = dict(cost or {})
    if cost.pop("type", kind) != kind or cost.keys() - {"weight"}:
        raise ValueError(f"HungarianAssigner3D: expected dict(type={kind!r}, weight=...), got {cost}")
    return cost.get("weight", 1.0)


@MODELS.register_module(name="HungarianAssigner3D")
def HungarianAssigner3D(cls_cost: dict, reg_cost: dict, iou_cost: Optional[dict] = None,
                        pc_range: Optional[Sequence[float]] = None) -> _Assigner:
    """``cls_cost=dict(type='FocalLossCost', weight=...)``, ``reg_cost=dict(type='BBox3DL1Cost', weight=...)``;
    ``iou_cost`` must weigh 0 (the official config's "fake cost"); ``pc_range`` is accepted and unused, as in
    the official ``normalize_bbox``."""
    if iou_cost is not None and _cost(iou_cost, "IoUCost") != 0:
        raise ValueError(f"HungarianAssigner3D: the library has no 3-D IoU cost; iou_cost weight must be 0, got {iou_cost}")
    return _Assigner(cls_weight=_cost(cls_cost, "FocalLossCost"), reg_weight=_cost(reg_cost, "BBox3DL1Cost"))


@MODELS.register_module(name="NMSFreeCoder")
def NMSFreeCoder(pc_range: Sequence[float], post_center_range: Sequence[float], max_num: int = 100,
                 num_classes: int = 10, voxel_size: Optional[Sequence[float]] = None,
                 score_threshold: Optional[float] = None) -> _Coder:
    """Top ``max_num`` over queries x classes, boxes outside ``post_center_range`` dropped (``voxel_size`` is
    unused officially too; ``score_threshold`` is not built)."""
    if score_threshold is not None:
        raise ValueError(f"NMSFreeCoder: score_threshold is not built, got {score_threshold!r}")
    if len(pc_range) != 6:
        raise ValueError(f"NMSFreeCoder: pc_range must be 6 numbers, got {pc_range!r}")
    return _Coder(num_classes, post_center_range, max_num)


@MODELS.register_module(name="Detr3DHead")
def Detr3DHead(num_classes: int, bbox_coder: dict, loss_cls: dict, loss_bbox: dict, loss_iou: Optional[dict] = None,
               code_size: int = 10, code_weights: Optional[Sequence[float]] = None, train_cfg: Optional[dict] = None,
               num_aux: int = 0, embed_dims: int = 256) -> SetPredictionHead:
    """The losses, assigner and coder of a ``Detr3DHead`` as a :class:`SetPredictionHead` (criterion:
    :class:`~detr_tutorial.detr3d_training.Detr3DCriterion` with aux losses on ``num_aux`` earlier layers;
    ``code_weights`` default to the official ``[1.0] * 8 + [0.2, 0.2]``, cut to ``code_size``)."""
    assigner = dict((train_cfg or {}).get("pts", {}) or {}).get("assigner")
    if assigner is None:
        raise ValueError("Detr3DHead: train_cfg must hold pts=dict(assigner=dict(type='HungarianAssigner3D', ...))")
    if loss_iou is not None and _loss_weight(loss_iou, "GIoULoss", "Detr3DHead") != 0:
        raise ValueError(f"Detr3DHead: loss_iou must weigh 0 (the official config's), got {loss_iou}")
    criterion = Detr3DCriterion(
        num_classes, MODELS.build(assigner), num_aux=num_aux,
        code_weights=([1.0] * 8 + [0.2, 0.2])[:code_size] if code_weights is None else code_weights,
        cls_weight=_loss_weight(loss_cls, "FocalLoss", "Detr3DHead", use_sigmoid=True, gamma=2.0, alpha=0.25),
        bbox_weight=_loss_weight(loss_bbox, "L1Loss", "Detr3DHead"))
    coder = MODELS.build(bbox_coder, default_args=dict(num_classes=num_classes))
    if coder.num_classes != num_classes:
        raise ValueError(f"Detr3DHead: bbox_coder num_classes {coder.num_classes} != head num_classes {num_classes}")
    return SetPredictionHead(criterion, coder, embed_dims)


class MultiViewDetector(Detector):
    """:class:`Detector` for batches ``(images (B, N, 3, H, W), lidar2img (B, N, 4, 4), targets)`` (the
    multi-view collate). ``mode='predict'`` returns the coder's boxes per scene (``boxes (k, 7)``, ``scores``,
    ``labels``) with the target's ``scene_id`` as ``image_id``; ``'tensor'`` and ``'loss'`` are :class:`Detector`'s."""

    def forward(self, images: Tensor, lidar2img: Optional[Tensor] = None, targets: Optional[Sequence[dict]] = None,
                mode: str = "tensor"):
        if mode != "predict" or targets is None:
            return super().forward(images, lidar2img, targets, mode)
        results = self.head.postprocess(self.detector(images, lidar2img))
        return [dict(r, image_id=int(t["scene_id"])) for r, t in zip(results, targets)]


def _decoder_kwargs(head: dict) -> dict:
    """``pts_bbox_head``'s model settings -> :class:`~detr_tutorial.models.DETR3D` keyword arguments."""
    if not head.pop("with_box_refine", False) or head.pop("as_two_stage", False):
        raise ValueError("Detr3D: the library's DETR3D refines boxes (with_box_refine=True, as_two_stage=False)")
    transformer = dict(head.pop("transformer", None) or {})
    decoder = dict(transformer.get("decoder") or {})
    layer = dict(decoder.get("transformerlayers") or {})
    attn = [dict(a) for a in layer.get("attn_cfgs", [])]
    if [a.get("type") for a in attn] != ["MultiheadAttention", "Detr3DCrossAtten"]:
        raise ValueError(f"Detr3D: attn_cfgs must be [MultiheadAttention, Detr3DCrossAtten], got {attn}")
    if tuple(layer.get("operation_order", ())) != OPERATION_ORDER:
        raise ValueError(f"Detr3D: operation_order must be {OPERATION_ORDER}, got {layer.get('operation_order')}")
    self_attn, cross = attn
    values = dict(embed_dims=self_attn.get("embed_dims", 256), cross_embed_dims=cross.get("embed_dims", 256),
                  in_channels=head.pop("in_channels", 256))
    dropouts = dict(dropout=self_attn.get("dropout", 0.0), ffn_dropout=layer.get("ffn_dropout", 0.0),
                    cross_dropout=cross.get("dropout", 0.1))
    levels = dict(num_levels=cross.get("num_levels", 4), num_feature_levels=transformer.get("num_feature_levels", 4))
    cams = dict(num_cams=cross.get("num_cams", 6), transformer_num_cams=transformer.get("num_cams", 6))
    for group in (values, dropouts, levels, cams):
        if len(set(group.values())) > 1:
            raise ValueError(f"Detr3D: the library uses one value for {sorted(group)}, got {group}")
    if cross.get("pc_range") is None:
        raise ValueError("Detr3D: Detr3DCrossAtten needs pc_range (x_min, y_min, z_min, x_max, y_max, z_max)")
    if cross.get("num_points", 5) != 1:
        raise ValueError(f"Detr3D: the library projects one point per query (num_points=1), got {cross.get('num_points', 5)}")
    if not decoder.get("return_intermediate", False):
        raise ValueError("Detr3D: the decoder must return every layer (return_intermediate=True)")
    return dict(num_queries=head.pop("num_query", 900), hidden_dim=values["embed_dims"],
                nheads=self_attn.get("num_heads", 8), dec_layers=decoder.get("num_layers", 6),
                dim_feedforward=layer.get("feedforward_channels", 1024), dropout=dropouts["dropout"],
                num_levels=levels["num_levels"], num_cams=cams["num_cams"], pc_range=tuple(cross["pc_range"]),
                code_size=head.get("code_size", 10))


@MODELS.register_module(name="Detr3D")
def Detr3D(img_backbone: dict, img_neck: dict, pts_bbox_head: dict, train_cfg: Optional[dict] = None,
           use_grid_mask: bool = False, data_preprocessor: Optional[dict] = None) -> MultiViewDetector:
    """DETR3D's detector config -> :class:`MultiViewDetector` around :class:`~detr_tutorial.models.DETR3D`.

    ``use_grid_mask`` (GridMask augmentation) is not built; ``data_preprocessor`` is the default one.
    """
    if use_grid_mask:
        raise ValueError("Detr3D: the library has no GridMask augmentation; set use_grid_mask=False")
    head = dict(pts_bbox_head)
    if head.pop("type", None) != "Detr3DHead" or "num_classes" not in head:
        raise ValueError(f"Detr3D: pts_bbox_head must be dict(type='Detr3DHead', num_classes=..., ...), got {head}")
    kwargs = _decoder_kwargs(head)
    backbone = MODELS.build(img_backbone)
    model = DETR3D(backbone, head["num_classes"], **kwargs)
    with torch.random.fork_rng(devices=[]):  # the neck's draws must not shift what follows (data order)
        neck = MODELS.build(img_neck)
    shapes = [tuple(p.shape) for p in model.input_proj.parameters()]
    if [tuple(p.shape) for p in neck.convs.parameters()] != shapes:
        raise ValueError(f"Detr3D: the neck {dict(img_neck)} does not fit the backbone's channels "
                         f"{backbone.num_channels}, {kwargs['num_levels']} levels and embed_dims {kwargs['hidden_dim']}")
    neck.convs.load_state_dict(model.input_proj.state_dict())  # the builder's initial values, seed for seed
    model.input_proj = neck.convs
    head = MODELS.build(dict(type="Detr3DHead", **head), default_args=dict(
        train_cfg=train_cfg, num_aux=kwargs["dec_layers"] - 1, embed_dims=kwargs["hidden_dim"]))
    return MultiViewDetector(model, head)
