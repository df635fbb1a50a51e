"""Deformable DETR (Zhu et al., 2021): DETR with multi-scale deformable attention.

::

    images (B, 3, H, W) --backbone--> 3 levels (strides 8, 16, 32) + 1 stride-2 conv (stride 64)
        --input_proj (1x1 or 3x3/2 conv + GroupNorm)--> 4 maps (B, d, H_l, W_l)
        --DeformableTransformer(query_embed (Q, 2d) = position | content)--> hs (layers, B, Q, d)
        --class_embed--> logits (B, Q, K)      (sigmoid per class, no "no object" logit)
        --bbox_embed + inverse_sigmoid(reference)--> sigmoid --> boxes (B, Q, 4)

Every decoder layer predicts its box *relative to its reference point*: the box
head adds ``inverse_sigmoid(reference)`` before the sigmoid, so a zero output
means "the box is centred on the reference". Options (as official):
``with_box_refine`` gives every layer its own heads and passes each layer's box
on as the next layer's reference; ``two_stage`` takes the queries from the
encoder's best-scoring per-pixel proposals (``enc_outputs``).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Joiner, build_backbone
from .deformable_transformer import DeformableTransformer, inverse_sigmoid
from .detr import MLP
from .position_encoding import PositionEmbeddingSine

__all__ = ["DeformableDETR", "build_deformable_detr", "input_projection"]


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, channels) as official; fewer groups when 32 does not divide ``channels``."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def input_projection(num_channels: Sequence[int], hidden: int, num_levels: int) -> nn.ModuleList:
    """The multi-scale input projection: per backbone level (``num_channels[l]`` channels) a 1x1 conv
    to ``hidden`` channels + GroupNorm, then ``num_levels - len(num_channels)`` extra levels, each a 3x3
    stride-2 conv (of the last backbone map, then of the previous extra level) + GroupNorm; convs
    Xavier-initialised with zero bias, as official. (MMDetection calls it the ``ChannelMapper`` neck.)"""
    projections, in_ch = [], num_channels[-1]
    for c in num_channels:
        projections.append(nn.Sequential(nn.Conv2d(c, hidden, kernel_size=1), _group_norm(hidden)))
    for _ in range(num_levels - len(num_channels)):
        projections.append(nn.Sequential(nn.Conv2d(in_ch, hidden, kernel_size=3, stride=2, padding=1),
                                         _group_norm(hidden)))
        in_ch = hidden
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projections)


class DeformableDETR(nn.Module):
    """Deformable DETR.

    Args:
        backbone: a ``Joiner`` whose backbone returns ``len(strides)`` levels.
        transformer: a ``DeformableTransformer``.
        num_classes: logits per query (sigmoid each; 91 for COCO as official).
        num_queries: object queries (300), the number of proposals with two-stage.
        num_feature_levels: levels fed to the transformer; levels beyond the backbone's
            are made by stride-2 3x3 convolutions of the previous one.
        aux_loss: also return every earlier decoder layer's predictions.
        with_box_refine: iterative box refinement (separate heads per layer).
        two_stage: queries from the encoder's proposals.
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int,
                 num_queries: int, num_feature_levels: int, aux_loss: bool = True,
                 with_box_refine: bool = False, two_stage: bool = False):
        super().__init__()
        for name, v in (("num_classes", num_classes), ("num_queries", num_queries),
                        ("num_feature_levels", num_feature_levels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_feature_levels < len(backbone.strides):
            raise ValueError(f"num_feature_levels ({num_feature_levels}) must be at least the backbone's "
                             f"{len(backbone.strides)} levels")
        if two_stage and not with_box_refine:  # the official code fails here too: no per-layer heads
            raise ValueError("two_stage=True needs with_box_refine=True (the encoder uses an extra head)")
        self.num_queries, self.num_classes = num_queries, num_classes
        self.num_feature_levels = num_feature_levels
        self.transformer, self.backbone = transformer, backbone
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        hidden = transformer.d_model
        class_embed = nn.Linear(hidden, num_classes)
        bbox_embed = MLP(hidden, hidden, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden * 2)  # position | content
        self.input_proj = input_projection(backbone.num_channels, hidden, num_feature_levels)

        # initialisation: every class starts at probability 0.01; boxes start on the reference
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:  # separate heads per layer; the decoder uses them to move references
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:  # one head shared by all layers
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)  # w, h start at sigmoid(-2) = 0.12
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for head in self.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias[2:])

    def multi_scale(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Projected maps ``(B, d, H_l, W_l)``, masks and position encodings of all levels."""
        features, pos = self.backbone(images, mask)
        srcs = [self._project(lvl, x, images.shape) for lvl, (x, _) in enumerate(features)]
        masks = [m for _, m in features]
        pos = list(pos)
        for lvl in range(len(features), self.num_feature_levels):
            src = self._project(lvl, features[-1][0] if lvl == len(features) else srcs[-1], images.shape)
            m = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(m)
            pos.append(self.backbone[1](m).to(src.dtype))
        return srcs, masks, pos

    def _project(self, lvl: int, x: Tensor, image_shape: torch.Size) -> Tensor:
        """``input_proj[lvl]`` (conv, GroupNorm), refusing a 1x1 map when each group holds one channel:
        GroupNorm would then normalise a single value."""
        conv, norm = self.input_proj[lvl]
        src = conv(x)
        if norm.num_groups == norm.num_channels and src.shape[-2] * src.shape[-1] == 1:
            strides = list(self.backbone.strides)
            strides = strides + [strides[-1] * 2 ** k for k in range(1, self.num_feature_levels - len(strides) + 1)]
            raise ValueError(f"images of {image_shape[-2]}x{image_shape[-1]} pixels are too small: level {lvl} "
                             f"(stride {strides[lvl]}) is a 1x1 map and GroupNorm({norm.num_groups}, "
                             f"{norm.num_channels}) has one channel per group; use images larger than "
                             f"{strides[-1]} pixels in height or width")
        return norm(src)

    def forward(self, images: Tensor, mask: Optional[Tensor] = None) -> dict:
        """Detect objects.

        Args:
            images: ``(B, 3, H, W)``; mask: ``(B, H, W)`` True on padding (None = no padding).

        Returns:
            dict with ``pred_logits (B, Q, K)``, ``pred_boxes (B, Q, 4)`` normalised (cx, cy, w, h),
            ``aux_outputs`` (earlier layers, with ``aux_loss``), ``enc_outputs`` (two-stage), and
            ``references``: list of ``layers + 1`` tensors ``(B, Q, 2 or 4)``, the reference each
            layer started from plus the last one handed on (for figures; unused by the loss).
        """
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        srcs, masks, pos = self.multi_scale(images, mask)
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_ref, inter_refs, enc_class, enc_coord = self.transformer(srcs, masks, pos, query_embed)

        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_ref if lvl == 0 else inter_refs[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])  # (B, Q, 4)
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(delta.sigmoid())
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
               "references": [r.detach() for r in (init_ref, *inter_refs)]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                  for c, b in zip(logits[:-1], boxes[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord.sigmoid()}
        return out


def build_deformable_detr(backbone: Union[str, nn.Module] = "resnet50", num_classes: int = 91,
                          hidden_dim: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                          dim_feedforward: int = 1024, num_queries: int = 300, dropout: float = 0.1,
                          num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                          aux_loss: bool = True, with_box_refine: bool = False, two_stage: bool = False,
                          train_backbone: bool = True, backbone_weights: Optional[str] = None,
                          small_widths: Sequence[int] = (32, 64, 128),
                          small_strides: Sequence[int] = (2, 2, 2)) -> DeformableDETR:
    """Build Deformable DETR with the official defaults (ResNet-50 layer2-4, 4 levels, 8 heads,
    4 points, 300 queries, FFN 1024, 6 + 6 layers, d 256, dropout 0.1).

    Args:
        backbone: a ResNet name, "small" (``SmallBackbone`` returning its last three stages,
            for CPU training) or a module with ``strides``, ``num_channels`` and
            ``forward(images, mask) -> [(features, mask), ...]``.
        num_feature_levels: 1 uses only the backbone's last level; otherwise the backbone's
            three levels plus ``num_feature_levels - 3`` stride-2 convolutions.
        other arguments: see :class:`DeformableDETR` and :class:`DeformableTransformer`.
    """
    multi = num_feature_levels > 1
    backbone = build_backbone(backbone, train_backbone=train_backbone, return_interm_layers=multi,
                              weights=backbone_weights, small_widths=small_widths, small_strides=small_strides)
    if hidden_dim % 2:
        raise ValueError(f"hidden_dim must be even (half the channels encode y, half x), got {hidden_dim}")
    position = PositionEmbeddingSine(hidden_dim // 2, normalize=True, offset=-0.5)
    transformer = DeformableTransformer(
        d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers, num_decoder_layers=dec_layers,
        dim_feedforward=dim_feedforward, dropout=dropout, num_feature_levels=num_feature_levels,
        dec_n_points=dec_n_points, enc_n_points=enc_n_points, two_stage=two_stage,
        two_stage_num_proposals=num_queries)
    return DeformableDETR(Joiner(backbone, position), transformer, num_classes=num_classes,
                          num_queries=num_queries, num_feature_levels=num_feature_levels, aux_loss=aux_loss,
                          with_box_refine=with_box_refine, two_stage=two_stage)
