"""Deformable DETR's transformer: deformable encoder, decoder with deformable cross-attention.

::

    srcs [(B, d, H_l, W_l)], masks, pos --flatten, + level_embed--> (B, S, d), S = Σ H_l·W_l
        encoder: every pixel attends (MSDeformAttn) around its own centre on all levels
        decoder: queries self-attend (dense, Q×Q), then attend (MSDeformAttn) around their
                 reference point; with box refinement each layer moves the reference box
        -> hs (layers, B, Q, d), initial and per-layer reference points

Reference points are normalised to the *valid* (non-padded) part of each image
and multiplied by each level's valid ratio before sampling, as in the official
code. Parameter names follow the official ``DeformableTransformer``.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import level_start_index
from .attention import MultiheadAttention
from .deformable_attention import MSDeformAttn

__all__ = ["DeformableTransformer", "DeformableTransformerEncoderLayer",
           "DeformableTransformerDecoderLayer", "inverse_sigmoid", "valid_ratios"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both terms to at least ``eps``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratios(mask: Tensor) -> Tensor:
    """Fraction of each padded map that holds image: ``(B, H, W)`` mask -> ``(B, 2)`` as (w, h)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, post-norm.

    ``forward(src (B, S, d), pos (B, S, d), reference_points (B, S, L, 2), spatial_shapes (L, 2),
    level_start_index (L,), padding_mask (B, S))`` -> ``(B, S, d)``.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerDecoderLayer(nn.Module):
    """Dense self-attention among queries, deformable cross-attention into the memory, FFN.

    ``forward(tgt (B, Q, d), query_pos (B, Q, d), reference_points (B, Q, L, 2 or 4), memory (B, S, d),
    spatial_shapes, level_start_index, padding_mask)`` -> ``(B, Q, d)``.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start,
                               padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: Tensor | Sequence[tuple[int, int]], ratios: Tensor) -> Tensor:
        """Centre of every pixel of every level, in the valid-image frame, then seen from each level.

        Args:
            spatial_shapes: ``(L, 2)``, or the levels' (H, W) as Python ints (under ``torch.export`` a
                tensor's values are unknown, the sizes of the feature maps are not);
            ratios: ``(B, L, 2)`` valid (w, h) ratios.

        Returns:
            ``(B, S, L, 2)`` normalised (x, y).
        """
        refs = []
        sizes = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
        for lvl, (h, w) in enumerate(sizes):
            ys, xs = torch.meshgrid(torch.arange(h, dtype=ratios.dtype, device=ratios.device) + 0.5,
                                    torch.arange(w, dtype=ratios.dtype, device=ratios.device) + 0.5,
                                    indexing="ij")
            x = xs.reshape(1, -1) / (ratios[:, None, lvl, 0] * w)  # (B, H·W), 1 = right edge of valid part
            y = ys.reshape(1, -1) / (ratios[:, None, lvl, 1] * h)
            refs.append(torch.stack([x, y], -1))
        return torch.cat(refs, 1)[:, :, None] * ratios[:, None]  # (B, S, L, 2)

    def forward(self, src: Tensor, spatial_shapes: Tensor | Sequence[tuple[int, int]], level_start: Tensor,
                ratios: Tensor, pos: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """src, pos (B, S, d); spatial_shapes (L, 2) or L pairs (H, W); level_start (L,); ratios (B, L, 2);
        padding_mask (B, S) -> (B, S, d)."""
        reference_points = self.get_reference_points(spatial_shapes, ratios)
        spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start, padding_mask)
        return src


class DeformableTransformerDecoder(nn.Module):
    """Decoder layers; with ``bbox_embed`` set (box refinement), layer ``i`` updates the
    reference box: ``sigmoid(bbox_embed[i](output) + inverse_sigmoid(reference))``, detached."""

    def __init__(self, layer: DeformableTransformerDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.bbox_embed: Optional[nn.ModuleList] = None  # set by DeformableDETR for refinement
        self.class_embed: Optional[nn.ModuleList] = None  # set by DeformableDETR for two-stage

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start: Tensor, ratios: Tensor, query_pos: Tensor,
                padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """-> ``hs (layers, B, Q, d)`` and the reference points each layer handed on
        ``(layers, B, Q, 2 or 4)``."""
        outputs, references = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:  # boxes: scale centre and size by the valid ratios
                ref_input = reference_points[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]
            else:
                ref_input = reference_points[:, :, None] * ratios[:, None]  # (B, Q, L, 2)
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, level_start, padding_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](tgt)
                if reference_points.shape[-1] == 4:
                    new_ref = delta + inverse_sigmoid(reference_points)
                else:  # a point reference only moves the centre; the box head supplies w, h
                    centre = delta[..., :2] + inverse_sigmoid(reference_points)
                    new_ref = torch.cat([centre, delta[..., 2:]], -1)
                reference_points = new_ref.sigmoid().detach()
            outputs.append(tgt)
            references.append(reference_points)
        return torch.stack(outputs), torch.stack(references)


class DeformableTransformer(nn.Module):
    """The whole transformer.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout:
            as in DETR (official defaults 256, 8, 6, 6, 1024, 0.1).
        num_feature_levels: levels of the input (4).
        dec_n_points, enc_n_points: sampling points per head and level (4, 4).
        two_stage: queries come from the best encoder proposals instead of learned embeddings.
        two_stage_num_proposals: how many proposals (= num_queries, 300).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 two_stage: bool = False, two_stage_num_proposals: int = 300):
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.two_stage, self.two_stage_num_proposals = two_stage, two_stage_num_proposals
        self.encoder = DeformableTransformerEncoder(DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points), num_encoder_layers)
        self.decoder = DeformableTransformerDecoder(DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points), num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def proposal_pos_embed(self, proposals: Tensor) -> Tensor:
        """Sine encoding of unactivated boxes ``(B, K, 4)`` -> ``(B, K, 2·d_model)``
        (``d_model / 2`` channels per coordinate, as the official 128 for d = 256)."""
        num_feats = self.d_model // 2
        dim_t = torch.arange(num_feats, dtype=torch.float32, device=proposals.device)
        dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
        pos = proposals.sigmoid()[..., None] * (2 * math.pi) / dim_t  # (B, K, 4, num_feats)
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(2)

    def encoder_proposals(self, memory: Tensor, padding_mask: Tensor,
                          spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """One proposal box per encoder pixel: its centre, size ``0.05 · 2^level``.

        Returns:
            memory ``(B, S, d)`` after ``enc_output`` (zeroed on padding and near-border
            proposals) and the proposals ``(B, S, 4)`` in inverse-sigmoid space (``inf`` = invalid).
        """
        b = memory.shape[0]
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            mask = padding_mask[:, start:start + h * w].view(b, h, w)
            valid = torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1)  # (B, 2) as (w, h)
            ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=memory.device),
                                    torch.arange(w, dtype=torch.float32, device=memory.device), indexing="ij")
            centre = (torch.stack([xs, ys], -1)[None] + 0.5) / valid.view(b, 1, 1, 2)  # (B, H, W, 2)
            size = torch.full_like(centre, 0.05 * 2.0 ** lvl)
            proposals.append(torch.cat([centre, size], -1).view(b, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)  # (B, S, 4)
        keep = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding_mask[..., None] | ~keep, float("inf"))
        memory = memory.masked_fill(padding_mask[..., None] | ~keep, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    def encode(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Flatten the levels (adding ``level_embed`` to the positions) and run the encoder.

        Returns:
            memory ``(B, S, d)``, padding mask ``(B, S)``, spatial_shapes ``(L, 2)``,
            level_start_index ``(L,)`` and valid ratios ``(B, L, 2)``.
        """
        sizes = [tuple(s.shape[-2:]) for s in srcs]  # Python ints: torch.export traces them as sizes
        spatial_shapes = torch.tensor(sizes, dtype=torch.long, device=srcs[0].device)
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, d)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl]
                              for lvl, p in enumerate(pos_embeds)], 1)  # (B, S, d)
        starts = level_start_index(spatial_shapes)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)  # (B, L, 2)
        empty = (ratios == 0).any(-1)  # (B, L): no valid row or column on a level
        if not torch.compiler.is_exporting() and empty.any():  # data-dependent: eager only
            b, lvl = empty.nonzero()[0].tolist()
            raise ValueError(f"masks[{lvl}] marks image {b} of the batch as fully padded; every image needs "
                             "at least one valid (False) pixel on every level")

        memory = self.encoder(src_flat, sizes, starts, ratios, pos_flat, mask_flat)
        return memory, mask_flat, spatial_shapes, starts, ratios

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """
        Args:
            srcs: per level ``(B, d, H_l, W_l)``; masks: ``(B, H_l, W_l)`` True on padding;
            pos_embeds: ``(B, d, H_l, W_l)``; query_embed: ``(Q, 2·d)`` (position | content),
                ignored with two-stage.

        Returns:
            ``hs (layers, B, Q, d)``, ``init_reference (B, Q, 2 or 4)``,
            ``inter_references (layers, B, Q, 2 or 4)``, and with two-stage the encoder's
            ``enc_outputs_class (B, S, K)`` and unactivated ``enc_outputs_coord (B, S, 4)``
            (None otherwise).
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed (Q, 2·d_model) is required unless two_stage=True")
        memory, mask_flat, spatial_shapes, starts, ratios = self.encode(srcs, masks, pos_embeds)

        b, _, c = memory.shape
        enc_class = enc_coord = None
        if self.two_stage:
            out_memory, proposals = self.encoder_proposals(memory, mask_flat, spatial_shapes)
            n = self.decoder.num_layers  # the extra, last head scores encoder proposals
            enc_class = self.decoder.class_embed[n](out_memory)  # (B, S, K)
            enc_coord = self.decoder.bbox_embed[n](out_memory) + proposals  # (B, S, 4) unactivated
            top = torch.topk(enc_class[..., 0], self.two_stage_num_proposals, dim=1)[1]  # (B, K')
            top_coords = torch.gather(enc_coord, 1, top[..., None].expand(-1, -1, 4)).detach()
            reference_points = top_coords.sigmoid()
            query_pos, tgt = torch.split(self.pos_trans_norm(self.pos_trans(
                self.proposal_pos_embed(top_coords).to(memory.dtype))), c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos[None].expand(b, -1, -1)  # (B, Q, d)
            tgt = tgt[None].expand(b, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)
        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, starts, ratios,
                                            query_pos, mask_flat)
        return hs, reference_points, inter_references, enc_class, enc_coord
