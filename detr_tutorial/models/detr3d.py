"""DETR3D (Wang et al., 2021): 3-D detection from several cameras with 3-D reference points.

::

    images (B, N, 3, H, W) --backbone shared by the N cameras + input projection-->
        L levels (B, N, d, H_l, W_l)
    query_embedding (Q, 2d) = query_pos | query;  reference points = sigmoid(Linear(query_pos)) (B, Q, 3)
    per decoder layer l:
        self-attention among the queries (+ norm)
        Detr3DCrossAtten: project each reference point into every camera (lidar2img), sample every
            level there (feature_sampling), weight by sigmoid(Linear(query)) x visibility, sum over
            cameras, points and levels, output_proj, + position encoder(inverse_sigmoid(reference))
            (+ norm), then FFN (+ norm)
        class branch l -> logits (B, Q, K);  reg branch l -> code (B, Q, 8)
        the code's centre offsets (0:2 and 4:5) move the reference point; the next layer gets it
        *detached* (the official ``with_box_refine``)

The box code is the official ``(cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy)`` without the
velocity: the synthetic world is static, so there is nothing to regress for ``vx, vy`` (their code
weights are 0.2 in the official head; here ``code_size=8``, as the official assigner's cost already
uses). Centres come out in metres (the sigmoid output de-normalised with ``pc_range``), sizes as logs,
the heading as (sin, cos); the other entries are raw branch outputs.

Parameter names follow the official ``Detr3DHead`` / ``Detr3DTransformer`` where they exist
(``query_embedding``, ``reference_points``, ``cls_branches``, ``reg_branches``, ``attention_weights``,
``output_proj``, ``position_encoder``).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .backbone import SmallBackbone
from .deformable_detr import input_projection
from .deformable_transformer import inverse_sigmoid
from .detr3d_geometry import check_lidar2img, feature_sampling
from .transformer import TransformerDecoderLayer

__all__ = ["DETR3D", "Detr3DCrossAtten", "Detr3DDecoderLayer", "build_detr3d", "denormalize_centres"]


def denormalize_centres(points: Tensor, pc_range: Sequence[float]) -> Tensor:
    """``(..., 3)`` points in [0, 1] -> metres: ``x * (max - min) + min`` per axis of ``pc_range``."""
    lo = points.new_tensor(pc_range[:3])
    return points * (points.new_tensor(pc_range[3:]) - lo) + lo


class Detr3DCrossAtten(nn.Module):
    """The official ``Detr3DCrossAtten``: one feature per camera and level at the projected reference point.

    Args:
        embed_dims: d.
        num_levels, num_cams: L and N.
        num_points: weights per (camera, level); the official config uses 1. Every point reads the same
            sampled feature (one 3-D point per query is projected), so more points only add weights.
        pc_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` in metres.
        dropout: on the attention output, before the residual.

    ``forward(query (B, Q, d), query_pos (B, Q, d), mlvl_feats [(B, N, d, H_l, W_l)], reference_points
    (B, Q, 3) in [0, 1], lidar2img (B, N, 4, 4), image_size (H, W), validate)`` -> ``(B, Q, d)``: ``dropout(out) +
    query + position_encoder(inverse_sigmoid(reference_points))`` (the residual is inside, as official).
    After a call, ``last_weights`` holds the ``(B, 1, Q, N, P, L)`` weights (sigmoid x mask), detached.
    """

    def __init__(self, embed_dims: int, num_levels: int, num_cams: int, pc_range: Sequence[float],
                 num_points: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        for name, value in (("embed_dims", embed_dims), ("num_levels", num_levels), ("num_cams", num_cams),
                            ("num_points", num_points)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(pc_range) != 6:
            raise ValueError(f"pc_range must be 6 numbers, got {pc_range!r}")
        self.num_levels, self.num_cams, self.num_points = num_levels, num_cams, num_points
        self.pc_range = tuple(float(v) for v in pc_range)
        self.attention_weights = nn.Linear(embed_dims, num_cams * num_levels * num_points)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.position_encoder = nn.Sequential(
            nn.Linear(3, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True),
            nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.last_weights: Optional[Tensor] = None
        nn.init.zeros_(self.attention_weights.weight)  # official: constant_init(attention_weights, 0)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, query_pos: Tensor, mlvl_feats: Sequence[Tensor], reference_points: Tensor,
                lidar2img: Tensor, image_size: tuple[int, int], validate: bool = True) -> Tensor:
        B, Q, _ = query.shape
        if len(mlvl_feats) != self.num_levels or mlvl_feats[0].shape[1] != self.num_cams:
            raise ValueError(f"mlvl_feats must hold {self.num_levels} levels of {self.num_cams} cameras, got "
                             f"{len(mlvl_feats)} levels of {mlvl_feats[0].shape[1]}")
        weights = self.attention_weights(query + query_pos).view(
            B, 1, Q, self.num_cams, self.num_points, self.num_levels)
        ref3d, sampled, mask = feature_sampling(mlvl_feats, reference_points, self.pc_range, lidar2img, image_size,
                                                validate=validate)
        weights = weights.sigmoid() * mask  # NOT a softmax: invisible cameras get 0, the visible ones add up
        self.last_weights = weights.detach()
        out = (sampled * weights).sum(-1).sum(-1).sum(-1)  # over levels, points, cameras -> (B, d, Q)
        out = self.output_proj(out.transpose(1, 2))
        return self.dropout(out) + query + self.position_encoder(inverse_sigmoid(ref3d))


class Detr3DDecoderLayer(TransformerDecoderLayer):
    """The official ``('self_attn', 'norm', 'cross_attn', 'norm', 'ffn', 'norm')``: DETR's post-norm decoder
    layer (its self-attention, FFN and norms) with :class:`Detr3DCrossAtten` as the cross-attention.

    ``forward(tgt (B, Q, d), query_pos (B, Q, d), mlvl_feats, reference_points (B, Q, 3), lidar2img,
    image_size)`` -> ``(B, Q, d)``. The inputs are not checked here: :class:`DETR3D` checks them once.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_levels: int,
                 num_cams: int, pc_range: Sequence[float], num_points: int = 1) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, "relu", normalize_before=False)
        self.multihead_attn = Detr3DCrossAtten(d_model, num_levels, num_cams, pc_range, num_points, dropout)
        del self.dropout2  # the cross-attention applies its own dropout before its residual

    def forward(self, tgt: Tensor, query_pos: Tensor, mlvl_feats: Sequence[Tensor], reference_points: Tensor,
                lidar2img: Tensor, image_size: tuple[int, int]) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        tgt = self.norm2(self.multihead_attn(tgt, query_pos, mlvl_feats, reference_points, lidar2img, image_size,
                                             validate=False))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


def _cls_branch(d: int, num_classes: int, num_fcs: int) -> nn.Sequential:
    layers = [m for _ in range(num_fcs) for m in (nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(inplace=True))]
    head = nn.Linear(d, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))  # every class starts at probability 0.01
    return nn.Sequential(*layers, head)


def _reg_branch(d: int, code_size: int, num_fcs: int) -> nn.Sequential:
    layers = [m for _ in range(num_fcs) for m in (nn.Linear(d, d), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(d, code_size))


class DETR3D(nn.Module):
    """A DETR3D: shared backbone, input projection, 3-D reference points, decoder with box refinement.

    Args:
        backbone: maps ``(B*N, 3, H, W)`` to a list of levels (``strides``, ``num_channels`` attributes).
        num_classes: K sigmoid logits per query.
        num_queries: Q.
        hidden_dim, nheads, dec_layers, dim_feedforward, dropout: the decoder's sizes.
        num_levels: levels fed to the cross-attention (the backbone's, plus stride-2 convolutions).
        num_cams: N, the cameras per sample.
        pc_range: the box of the world the reference points span, in metres.
        num_reg_fcs: hidden layers of the class and reg branches (2, official).
        code_size: 8 (see the module docstring).

    ``forward(images (B, N, 3, H, W), lidar2img (B, N, 4, 4))`` returns ``pred_logits (B, Q, K)``,
    ``pred_boxes (B, Q, 8)`` (last layer), ``aux_outputs`` (the earlier layers, same keys) and
    ``references`` (``dec_layers + 1`` tensors ``(B, Q, 3)`` in [0, 1], detached: each layer's input
    reference point and the last refined one).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_queries: int = 900, hidden_dim: int = 256,
                 nheads: int = 8, dec_layers: int = 6, dim_feedforward: int = 512, dropout: float = 0.1,
                 num_levels: int = 4, num_cams: int = 6,
                 pc_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), num_reg_fcs: int = 2,
                 code_size: int = 8) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_queries", num_queries), ("dec_layers", dec_layers),
                            ("num_levels", num_levels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if code_size not in (8, 10):
            raise ValueError(f"code_size must be 8 (no velocity) or 10 (with vx, vy), got {code_size!r}")
        if len(pc_range) != 6 or not all(pc_range[i + 3] > pc_range[i] for i in range(3)):
            raise ValueError(f"pc_range must be (x_min, y_min, z_min, x_max, y_max, z_max) with max > min, "
                             f"got {pc_range!r}")
        if num_levels < len(backbone.num_channels):
            raise ValueError(f"num_levels ({num_levels}) must be at least the backbone's "
                             f"{len(backbone.num_channels)} levels")
        self.num_classes, self.num_queries, self.num_cams = num_classes, num_queries, num_cams
        self.code_size = code_size
        self.pc_range = tuple(float(v) for v in pc_range)
        self.backbone = backbone
        self.input_proj = input_projection(backbone.num_channels, hidden_dim, num_levels)
        self.query_embedding = nn.Embedding(num_queries, 2 * hidden_dim)  # query_pos | query
        self.reference_points = nn.Linear(hidden_dim, 3)
        layer = Detr3DDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, num_levels, num_cams, pc_range)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(dec_layers))
        for p in self.layers.parameters():  # official: xavier on the transformer, then each module's own init
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.layers:
            nn.init.zeros_(layer.multihead_attn.attention_weights.weight)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        self.cls_branches = nn.ModuleList(_cls_branch(hidden_dim, num_classes, num_reg_fcs) for _ in range(dec_layers))
        self.reg_branches = nn.ModuleList(_reg_branch(hidden_dim, code_size, num_reg_fcs) for _ in range(dec_layers))

    def extract_feats(self, images: Tensor) -> list[Tensor]:
        """``(B, N, 3, H, W)`` -> ``num_levels`` maps ``(B, N, d, H_l, W_l)``: every camera through the same
        backbone and input projection (levels beyond the backbone's by stride-2 convs of the previous)."""
        B, N = images.shape[:2]
        features = self.backbone.extract(images.flatten(0, 1))
        maps = [proj(x) for proj, x in zip(self.input_proj, features)]
        for lvl in range(len(features), len(self.input_proj)):
            maps.append(self.input_proj[lvl](features[-1] if lvl == len(features) else maps[-1]))
        return [m.view(B, N, *m.shape[1:]) for m in maps]

    def forward(self, images: Tensor, lidar2img: Tensor) -> dict:
        self._check_inputs(images, lidar2img)
        B, image_size = images.shape[0], tuple(images.shape[-2:])
        feats = self.extract_feats(images)
        query_pos, query = self.query_embedding.weight.expand(B, -1, -1).chunk(2, -1)
        reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 3), not detached: layer 0 trains it
        references, logits, codes = [reference], [], []
        for layer, cls_branch, reg_branch in zip(self.layers, self.cls_branches, self.reg_branches):
            query = layer(query, query_pos, feats, reference, lidar2img, image_size)
            tmp = reg_branch(query)  # (B, Q, code_size)
            refined = (torch.cat([tmp[..., 0:2], tmp[..., 4:5]], -1) + inverse_sigmoid(reference)).sigmoid()
            centre = denormalize_centres(refined, self.pc_range)  # metres
            codes.append(torch.cat([centre[..., 0:2], tmp[..., 2:4], centre[..., 2:3], tmp[..., 5:]], -1))
            logits.append(cls_branch(query))
            reference = refined.detach()  # the next layer starts from the refined point, without its gradient
            references.append(reference)
        return {"pred_logits": logits[-1], "pred_boxes": codes[-1],
                "aux_outputs": [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], codes[:-1])],
                "references": [r.detach() for r in references]}

    def _check_inputs(self, images: Tensor, lidar2img: Tensor) -> None:
        if not isinstance(images, Tensor) or not isinstance(lidar2img, Tensor):
            raise TypeError(f"images and lidar2img must be tensors, got {type(images).__name__} and "
                            f"{type(lidar2img).__name__}")
        if images.dim() != 5 or images.shape[1] != self.num_cams or images.shape[2] != 3:
            raise ValueError(f"images must have shape (B, N={self.num_cams}, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor, got {images.dtype}")
        if lidar2img.shape != (images.shape[0], self.num_cams, 4, 4):
            raise ValueError(f"lidar2img must have shape (B={images.shape[0]}, N={self.num_cams}, 4, 4), "
                             f"got {tuple(lidar2img.shape)}")
        check_lidar2img(lidar2img)
        if not torch.isfinite(images).all():
            raise ValueError("images hold NaN or infinite values")


def build_detr3d(num_classes: int = 10, num_queries: int = 900, hidden_dim: int = 256, nheads: int = 8,
                 dec_layers: int = 6, dim_feedforward: int = 512, dropout: float = 0.1, num_levels: int = 4,
                 num_cams: int = 6, pc_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
                 small_widths: Sequence[int] = (32, 64, 128), small_strides: Sequence[int] = (2, 2, 2),
                 code_size: int = 8) -> DETR3D:
    """A DETR3D on the library's ``SmallBackbone`` (its last three stages, plus ``num_levels - 3`` stride-2
    convolutions), trained from scratch. Defaults are the official config's decoder (900 queries, d 256,
    8 heads, 6 layers, FFN 512, dropout 0.1, 4 levels, 6 cameras, nuScenes' ``pc_range``); a CPU-sized
    model sets smaller ones (see the ``detr3d`` presets)."""
    backbone = SmallBackbone(small_widths, small_strides, return_interm_layers=True)
    return DETR3D(backbone, num_classes, num_queries=num_queries, hidden_dim=hidden_dim, nheads=nheads,
                  dec_layers=dec_layers, dim_feedforward=dim_feedforward, dropout=dropout, num_levels=num_levels,
                  num_cams=num_cams, pc_range=pc_range, code_size=code_size)
