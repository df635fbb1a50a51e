"""Backbone, neck, positional encoding and assigner under MMDetection's type names, built from the library.

=========================  =====================================================  ==============================
type                       MMDetection 3.x file (2.x file)                        what it builds here
=========================  =====================================================  ==============================
``ResNet``                 ``mmdet/models/backbones/resnet.py`` (same in 2.x)     :class:`ResNetBackbone`
``SmallBackbone``          (the book's CPU backbone, no MMDetection counterpart)  :class:`SmallBackbone`
``ChannelMapper``          ``mmdet/models/necks/channel_mapper.py`` (same)        :func:`input_projection` or
                                                                                  DETR's 1x1 ``input_proj``
``SinePositionalEncoding`` ``mmdet/models/layers/positional_encoding.py``         :class:`PositionEmbeddingSine`
                           (2.x: ``mmcv/cnn/bricks/transformer.py``)
``HungarianAssigner``      ``mmdet/models/task_modules/assigners/                 :class:`HungarianMatcher`
                           hungarian_assigner.py`` (2.x: ``mmdet/core/bbox/
                           assigners/hungarian_assigner.py``)
=========================  =====================================================  ==============================
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ..matcher import HungarianMatcher
from ..models import PositionEmbeddingSine, ResNetBackbone, SmallBackbone
from ..models.deformable_detr import input_projection
from .registry import MODELS

__all__ = ["ChannelMapper", "HungarianAssigner", "ResNet", "SinePositionalEncoding"]

#: ``out_indices`` of an MMDetection ResNet -> the library's ``return_interm_layers``.
_OUT_INDICES = {(3,): False, (1, 2, 3): True}
_STAGES = {"conv1": 0, "bn1": 0, "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}  # stem = stage 0


@MODELS.register_module(name="ResNet")
def ResNet(depth: int = 50, num_stages: int = 4, out_indices: Sequence[int] = (3,), frozen_stages: int = 1,
           norm_cfg: Optional[dict] = None, norm_eval: bool = True, style: str = "pytorch",
           init_cfg: Optional[dict] = None) -> ResNetBackbone:
    """MMDetection's ``ResNet`` settings -> the library's :class:`ResNetBackbone`.

    ``out_indices`` (3,) returns layer4 (DETR); (1, 2, 3) layer2-4 (Deformable DETR). ``frozen_stages=k``
    freezes the stem and layer1..layerk (-1: nothing; DETR and Deformable DETR use 1, which is the library's
    ``train_backbone=True``). The library's ResNet always has frozen BatchNorm, i.e. MMDetection's
    ``norm_cfg=dict(type='BN', requires_grad=False)`` with ``norm_eval=True``; other norms are refused.
    ``init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')`` loads torchvision's ImageNet
    weights (a download); ``None`` starts from random weights.
    """
    if depth not in (18, 34, 50, 101):
        raise ValueError(f"ResNet: depth must be 18, 34, 50 or 101, got {depth!r}")
    if num_stages != 4 or style != "pytorch":
        raise ValueError(f"ResNet: only num_stages=4 and style='pytorch' are built, got {num_stages!r}, {style!r}")
    if tuple(out_indices) not in _OUT_INDICES:
        raise ValueError(f"ResNet: out_indices must be one of {list(_OUT_INDICES)}, got {out_indices!r}")
    if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= 4:
        raise ValueError(f"ResNet: frozen_stages must be an int in -1..4, got {frozen_stages!r}")
    norm_cfg = dict(type="BN", requires_grad=False) if norm_cfg is None else dict(norm_cfg)
    if norm_cfg != dict(type="BN", requires_grad=False) or norm_eval is not True:
        raise ValueError("ResNet: the library's ResNet has frozen BatchNorm; norm_cfg must be "
                         f"dict(type='BN', requires_grad=False) and norm_eval True, got {norm_cfg} and {norm_eval!r}")
    weights = None
    if init_cfg is not None:
        expected = dict(type="Pretrained", checkpoint=f"torchvision://resnet{depth}")
        if dict(init_cfg) != expected:
            raise ValueError(f"ResNet: init_cfg must be None or {expected}, got {dict(init_cfg)}")
        weights = "IMAGENET1K_V1"
    backbone = ResNetBackbone(f"resnet{depth}", train_backbone=frozen_stages < 4,
                              return_interm_layers=_OUT_INDICES[tuple(out_indices)], weights=weights)
    for name, p in backbone.body.named_parameters():
        p.requires_grad_(_STAGES[name.split(".")[0]] > frozen_stages)
    return backbone


MODELS.register_module(name="SmallBackbone", module=SmallBackbone)


@MODELS.register_module(name="SinePositionalEncoding")
def SinePositionalEncoding(num_feats: int = 128, temperature: float = 10000, normalize: bool = False,
                           scale: Optional[float] = None, eps: float = 1e-6,
                           offset: float = 0.0) -> PositionEmbeddingSine:
    """MMDetection's ``SinePositionalEncoding`` -> :class:`PositionEmbeddingSine` (same arguments;
    ``num_feats`` channels per axis, ``mask (B, H, W) -> (B, 2 * num_feats, H, W)``)."""
    if eps != 1e-6:
        raise ValueError(f"SinePositionalEncoding: the library's eps is 1e-6, got eps={eps!r}")
    return PositionEmbeddingSine(num_feats, temperature=temperature, normalize=normalize, scale=scale, offset=offset)


@MODELS.register_module(name="ChannelMapper")
class ChannelMapper(nn.Module):
    """MMDetection's neck: one conv per input level to ``out_channels``, plus extra stride-2 levels.

    With ``norm_cfg=dict(type='GN', num_groups=32)`` (Deformable DETR) ``convs`` is the library's
    :func:`input_projection` (1x1 conv + GroupNorm per level, 3x3 stride-2 conv + GroupNorm per extra
    level); with ``norm_cfg=None`` and one level (DETR in MMDetection 3.x) it is DETR's 1x1 ``input_proj``.
    The library's convs keep their bias in front of GroupNorm, as the official code does (MMDetection's
    ``ConvModule`` drops it, ``bias='auto'``: ``out_channels`` parameters fewer per level).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, kernel_size: int = 1,
                 norm_cfg: Optional[dict] = None, act_cfg: Optional[dict] = None, num_outs: Optional[int] = None):
        super().__init__()
        in_channels = list(in_channels)
        num_outs = len(in_channels) if num_outs is None else num_outs
        if kernel_size != 1 or act_cfg is not None:
            raise ValueError(f"ChannelMapper: the library's projection has kernel_size=1 and act_cfg=None, "
                             f"got {kernel_size!r} and {act_cfg!r}")
        if num_outs < len(in_channels):
            raise ValueError(f"ChannelMapper: num_outs ({num_outs}) must be >= len(in_channels) ({len(in_channels)})")
        if norm_cfg is None:
            if num_outs != 1 or len(in_channels) != 1:
                raise ValueError("ChannelMapper: without norm_cfg only DETR's single level is built "
                                 f"(in_channels of length 1, num_outs=1), got {in_channels} and {num_outs}")
            self.convs = nn.ModuleList([nn.Conv2d(in_channels[0], out_channels, kernel_size=1)])
        elif dict(norm_cfg) == dict(type="GN", num_groups=32):
            self.convs = input_projection(in_channels, out_channels, num_outs)
        else:
            raise ValueError(f"ChannelMapper: norm_cfg must be None or dict(type='GN', num_groups=32), got {norm_cfg}")
        self.num_inputs = len(in_channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``features[l] (B, in_channels[l], H_l, W_l)`` -> ``num_outs`` maps ``(B, out_channels, H_l, W_l)``;
        the first extra level reads the last input, the next ones the previous output."""
        if len(features) != self.num_inputs:
            raise ValueError(f"ChannelMapper expects {self.num_inputs} feature maps, got {len(features)}")
        outs = [conv(x) for conv, x in zip(self.convs, features)]
        for lvl in range(self.num_inputs, len(self.convs)):
            outs.append(self.convs[lvl](features[-1] if lvl == self.num_inputs else outs[-1]))
        return outs


#: MMDetection's match-cost types -> the matcher's argument.
_COSTS = {"ClassificationCost": "cost_class", "FocalLossCost": "cost_class", "BBoxL1Cost": "cost_bbox",
          "IoUCost": "cost_giou"}


@MODELS.register_module(name="HungarianAssigner")
def HungarianAssigner(match_costs: Sequence[dict], num_classes: int) -> HungarianMatcher:
    """MMDetection 3.x's ``HungarianAssigner(match_costs=[...])`` -> :class:`HungarianMatcher`.

    ``ClassificationCost`` is DETR's softmax class cost, ``FocalLossCost`` (alpha 0.25, gamma 2) the sigmoid
    one of its successors; ``BBoxL1Cost`` (``box_format='xywh'``, i.e. cx, cy, w, h) and ``IoUCost``
    (``iou_mode='giou'``) the box costs. 2.x spelled the same as ``cls_cost``, ``reg_cost``, ``iou_cost``.
    """
    kwargs: dict = {}
    for cost in match_costs:
        cost = dict(cost)
        kind, weight = cost.pop("type", None), cost.pop("weight", 1.0)
        if kind not in _COSTS:
            raise ValueError(f"HungarianAssigner: unknown match cost type {kind!r}; known: {sorted(_COSTS)}")
        allowed = {"BBoxL1Cost": {"box_format": "xywh"}, "IoUCost": {"iou_mode": "giou"},
                   "FocalLossCost": {"alpha": 0.25, "gamma": 2.0}}.get(kind, {})
        if any(allowed.get(k, object()) != v for k, v in cost.items()):
            raise ValueError(f"HungarianAssigner: {kind} settings {cost} are not built; allowed: {allowed}")
        if kind == "FocalLossCost":
            kwargs["focal_alpha"] = cost.get("alpha", 0.25)
        kwargs[_COSTS[kind]] = weight
    missing = [name for name in ("cost_class", "cost_bbox", "cost_giou") if name not in kwargs]
    if missing:
        raise ValueError(f"HungarianAssigner: match_costs lacks {missing}; give a class, an L1 and a GIoU cost")
    return HungarianMatcher(num_classes=num_classes, **kwargs)
