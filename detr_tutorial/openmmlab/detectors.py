"""Detectors and heads under MMDetection's type names: a config's ``model`` -> the library's model.

MMDetection 3.x splits a DETR-family detector into ``backbone``, ``neck``, ``positional_encoding``,
``encoder`` / ``decoder`` settings and a ``bbox_head`` that holds the class and box branches, the losses
and, through ``train_cfg.assigner``, the matcher (``mmdet/models/detectors/detr.py``,
``mmdet/models/dense_heads/detr_head.py``; in 2.x the transformer was a config of its own inside the head,
``mmdet/models/utils/transformer.py``). The library keeps the branches in the model and the losses in a
criterion, so here a config builds

* the model with the library's builder (:func:`~detr_tutorial.models.build_detr` and its siblings), its
  backbone, positional encoding and input projection replaced by the config-built parts, and
* a :class:`SetPredictionHead`: the library's :class:`~detr_tutorial.losses.SetCriterion` and
  post-processing, with the loss weights and matcher of ``bbox_head`` and ``train_cfg``,

joined in a :class:`Detector`, an mmengine ``BaseModel`` that the Runner trains.

The neck is built aside and takes the builder's projection weights, so with the same seed a config-built
model starts from the weights the builder draws and leaves torch's generator where the builder leaves it.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from mmengine.model import BaseModel
from torch import Tensor, nn

from ..losses import SetCriterion
from ..models import build_conditional_detr, build_dab_detr, build_deformable_detr, build_detr
from ..postprocess import PostProcess, PostProcessTopK
from ..recipes import loss_weights
from .registry import MODELS

__all__ = ["Detector", "SetPredictionHead"]


class SetPredictionHead(nn.Module):
    """The training and inference side of a ``bbox_head``: ``criterion`` (a ``SetCriterion`` whose
    ``weight_dict`` holds the config's loss weights for every decoder layer) and ``postprocess``."""

    def __init__(self, criterion: SetCriterion, postprocess: Callable, embed_dims: int) -> None:
        super().__init__()
        self.criterion, self.postprocess, self.embed_dims = criterion, postprocess, embed_dims

    def loss(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        """Weighted loss terms (the Runner sums the keys holding ``loss``) and the criterion's logged errors."""
        terms = self.criterion(outputs, targets)
        weights = self.criterion.weight_dict
        return {k: v * weights[k] if k in weights else v.detach() for k, v in terms.items()}


def _loss_weight(loss: dict, kind: str, head: str, **fixed) -> float:
    loss = dict(loss)
    if loss.pop("type", None) != kind or any(loss.pop(k, v) != v for k, v in fixed.items()):
        raise ValueError(f"{head}: expected a {kind} with {fixed or 'default settings'}, got {loss}")
    weight = loss.pop("loss_weight", 1.0)
    if loss:
        raise ValueError(f"{head}: {kind} settings {sorted(loss)} are not built by the library")
    return weight


def _head(name: str, num_classes: int, embed_dims: int, loss_cls: dict, loss_bbox: dict, loss_iou: dict,
          train_cfg: Optional[dict], test_cfg: Optional[dict], num_aux: int, encoder: bool = False) -> SetPredictionHead:
    if not train_cfg or "assigner" not in train_cfg:
        raise ValueError(f"{name}: train_cfg must hold an 'assigner' (the HungarianAssigner settings)")
    focal = name != "DETRHead"
    if focal:
        cls_weight = _loss_weight(loss_cls, "FocalLoss", name, use_sigmoid=True, gamma=2.0, alpha=0.25)
        eos_coef, focal_alpha = 0.1, 0.25
    else:
        loss_cls = dict(loss_cls)
        eos_coef = loss_cls.pop("bg_cls_weight", 0.1)
        cls_weight = _loss_weight(loss_cls, "CrossEntropyLoss", name, use_sigmoid=False, class_weight=1.0)
        focal_alpha = None
    weights = {"loss_ce": cls_weight, "loss_bbox": _loss_weight(loss_bbox, "L1Loss", name),
               "loss_giou": _loss_weight(loss_iou, "GIoULoss", name)}
    matcher = MODELS.build(train_cfg["assigner"], default_args=dict(num_classes=num_classes))
    criterion = SetCriterion(num_classes, matcher, loss_weights(weights, num_aux, encoder), eos_coef,
                             ["labels", "boxes", "cardinality"], focal_alpha=focal_alpha)
    max_per_img = dict(test_cfg or {}).get("max_per_img", 100)
    postprocess = PostProcessTopK(num_classes, k=max_per_img) if focal else PostProcess(num_classes)
    return SetPredictionHead(criterion, postprocess, embed_dims)


def _register_head(name: str) -> None:
    def build(num_classes: int, embed_dims: int = 256, loss_cls: Optional[dict] = None,
              loss_bbox: Optional[dict] = None, loss_iou: Optional[dict] = None, train_cfg: Optional[dict] = None,
              test_cfg: Optional[dict] = None, num_aux: int = 0,
              encoder: bool = False) -> SetPredictionHead:
        missing = [k for k, v in (("loss_cls", loss_cls), ("loss_bbox", loss_bbox), ("loss_iou", loss_iou)) if v is None]
        if missing:
            raise ValueError(f"{name}: the config lacks {missing}")
        return _head(name, num_classes, embed_dims, loss_cls, loss_bbox, loss_iou, train_cfg, test_cfg, num_aux,
                     encoder)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"MMDetection's ``{name}`` -> :class:`SetPredictionHead` (see :mod:`{__name__}`)."
    MODELS.register_module(name=name, module=build)


for _name in ("DETRHead", "DeformableDETRHead", "ConditionalDETRHead", "DABDETRHead"):
    _register_head(_name)


class Detector(BaseModel):
    """A library model and its head as an mmengine model: ``forward(images, mask, targets, mode)``.

    ``mode='tensor'``: the model's output dict; ``'loss'``: :meth:`SetPredictionHead.loss`;
    ``'predict'``: one dict per image with ``image_id``, ``scores``, ``labels`` and pixel xyxy ``boxes``
    (post-processed at each target's ``size``). Batches are :func:`detr_tutorial.data.collate_fn`'s
    ``(images (B, 3, H, W), mask (B, H, W), targets)``; the default data preprocessor moves them to the device.
    """

    def __init__(self, detector: nn.Module, head: SetPredictionHead) -> None:
        super().__init__()
        self.detector, self.head = detector, head

    def forward(self, images: Tensor, mask: Optional[Tensor] = None, targets: Optional[Sequence[dict]] = None,
                mode: str = "tensor"):
        outputs = self.detector(images, mask)
        if mode == "tensor":
            return outputs
        if targets is None:
            raise ValueError(f"mode={mode!r} needs targets (ground truth for 'loss', image ids and sizes for 'predict')")
        if mode == "loss":
            return self.head.loss(outputs, targets)
        if mode == "predict":
            sizes = torch.stack([t["size"] for t in targets]).to(images.device)
            results = self.head.postprocess(outputs, sizes)
            return [dict(r, image_id=int(t["image_id"])) for r, t in zip(results, targets)]
        raise ValueError(f"mode must be 'tensor', 'loss' or 'predict', got {mode!r}")


def _attn(layer_cfg: dict, key: str) -> dict:
    return dict(dict(layer_cfg).get(key) or {})


def _check_same(name: str, **values) -> None:
    if len(set(values.values())) > 1:
        raise ValueError(f"{name}: the library uses one value for {sorted(values)}, got {values}")


#: detector type -> the library's builder
_BUILDERS = {"DETR": build_detr, "DeformableDETR": build_deformable_detr,
             "ConditionalDETR": build_conditional_detr, "DABDETR": build_dab_detr}


def _detector(name: str, cfg: dict) -> Detector:
    missing = [k for k in ("backbone", "neck", "encoder", "decoder", "positional_encoding", "bbox_head", "train_cfg")
               if k not in cfg]
    if missing:
        raise ValueError(f"{name}: the model config lacks {missing}")
    encoder, decoder = dict(cfg["encoder"]), dict(cfg["decoder"])
    enc_layer, dec_layer = dict(encoder.get("layer_cfg") or {}), dict(decoder.get("layer_cfg") or {})
    ffn = _attn(enc_layer, "ffn_cfg")
    self_attn = _attn(dec_layer, "self_attn_cfg")
    hidden = ffn.get("embed_dims", 256)
    _check_same(name, embed_dims=hidden, decoder_embed_dims=self_attn.get("embed_dims", 256))
    dropout = ffn.get("ffn_drop", 0.1)
    _check_same(name, ffn_drop=dropout, attn_dropout=self_attn.get("dropout", 0.1))
    kwargs = dict(hidden_dim=hidden, nheads=self_attn.get("num_heads", 8), enc_layers=encoder.get("num_layers", 6),
                  dec_layers=decoder.get("num_layers", 6), dim_feedforward=ffn.get("feedforward_channels", 1024),
                  dropout=dropout, num_queries=cfg.get("num_queries", 100), aux_loss=True)
    act = dict(ffn.get("act_cfg") or dict(type="ReLU")).get("type")
    if name == "DABDETR":
        kwargs["activation"] = act.lower()
    elif act != "ReLU":
        raise ValueError(f"{name}: the library's FFN uses ReLU, got act_cfg type {act!r}")
    if name == "DeformableDETR":
        kwargs.update(num_feature_levels=cfg.get("num_feature_levels", 4),
                      enc_n_points=_attn(enc_layer, "self_attn_cfg").get("num_points", 4),
                      dec_n_points=_attn(dec_layer, "cross_attn_cfg").get("num_points", 4),
                      with_box_refine=cfg.get("with_box_refine", False), two_stage=cfg.get("as_two_stage", False))
    backbone = MODELS.build(cfg["backbone"])
    model = _BUILDERS[name](backbone, num_classes=cfg["bbox_head"]["num_classes"], **kwargs)
    model.backbone[1] = MODELS.build(dict(dict(type="SinePositionalEncoding"), **cfg["positional_encoding"]))
    with torch.random.fork_rng(devices=[]):  # the neck's draws must not shift what follows (data order)
        neck = MODELS.build(cfg["neck"])
    if [c.weight.shape for c in neck.modules() if isinstance(c, nn.Conv2d)] != \
            [c.weight.shape for c in model.input_proj.modules() if isinstance(c, nn.Conv2d)]:
        raise ValueError(f"{name}: the neck {dict(cfg['neck'])} does not fit the backbone's channels "
                         f"{backbone.num_channels} and the model's levels and embed_dims {hidden}")
    projection = neck.convs if name == "DeformableDETR" else neck.convs[0]
    projection.load_state_dict(model.input_proj.state_dict())  # the builder's initial values, seed for seed
    model.input_proj = projection
    num_aux = model.transformer.decoder.num_layers - 1
    head = MODELS.build(cfg["bbox_head"], default_args=dict(
        train_cfg=cfg["train_cfg"], test_cfg=cfg.get("test_cfg"), num_aux=num_aux,
        encoder=bool(cfg.get("as_two_stage", False))))
    _check_same(name, model_embed_dims=hidden, head_embed_dims=head.embed_dims)
    return Detector(model, head)


def _register_detector(name: str) -> None:
    def build(**cfg) -> Detector:
        cfg.pop("data_preprocessor", None)  # the default one: batches are tensors already
        return _detector(name, cfg)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"MMDetection's ``{name}`` config -> :class:`Detector` around the library's model."
    MODELS.register_module(name=name, module=build)


for _name in _BUILDERS:
    _register_detector(_name)
