"""The layers Conditional DETR adds to DETR's decoder (shared with DAB-DETR).

* ``sine_embed_points`` -- the sinusoidal encoding of DETR's image positions,
  applied to continuous reference points (x, y) or boxes (x, y, w, h) in [0, 1].
* ``ProjectionFreeAttention`` -- multi-head attention on queries, keys and
  values that arrive already projected (only the output projection is
  learned), so that queries/keys may be wider than the values.
* ``ConditionalDecoderLayer`` -- DETR's decoder layer with separate linear
  maps for the content and the positional part of every query and key. In
  cross-attention the two parts are *concatenated* per head instead of added,
  so each head scores content against content plus position against position
  (``q_c.k_c + q_p.k_p``), and the positional query ``q_p`` is the
  "conditional spatial query" the decoder computes from a reference point.

Submodule names are the official ones (``sa_qcontent_proj``, ``ca_qpos_sine_proj``,
``cross_attn.out_proj`` ...), so official checkpoints load unchanged. Tensors
are batch-first: (B, L, d).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .attention import scaled_dot_product_attention
from .position_encoding import sine_encode
from .transformer import _LayerBase

__all__ = ["sine_embed_points", "ProjectionFreeAttention", "ConditionalDecoderLayer"]


def sine_embed_points(points: Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> Tensor:
    """Sine encoding of normalised points or boxes: (..., 2) or (..., 4) -> (..., 2F) or (..., 4F).

    Each coordinate ``c`` in [0, 1] becomes ``sine_encode(2 pi c)`` with ``F = num_pos_feats``
    channels (the image encoding of DETR with ``normalize=True``, without its 1e-6). The
    output lists (y, x) -- then (w, h) for boxes -- so its first half matches the layout
    of the image features' encoding.
    """
    if not isinstance(points, Tensor):
        raise TypeError(f"points must be a torch.Tensor, got {type(points).__name__}")
    if points.dim() < 1 or points.shape[-1] not in (2, 4):
        raise ValueError("points must have a last dimension of 2 (x, y) or 4 (x, y, w, h), "
                         f"got shape {tuple(points.shape)}")
    if not isinstance(num_pos_feats, int) or num_pos_feats < 2 or num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be an even int >= 2, got {num_pos_feats!r}")
    if not torch.compiler.is_exporting() and not ((points >= 0) & (points <= 1)).all():  # data-dependent: eager only
        raise ValueError("points must be normalised to [0, 1] (sigmoid outputs), got values in "
                         f"[{points.min().item():.3g}, {points.max().item():.3g}]")
    enc = [sine_encode(points[..., i] * 2 * math.pi, num_pos_feats, temperature)
           for i in range(points.shape[-1])]
    enc[0], enc[1] = enc[1], enc[0]  # y before x
    return torch.cat(enc, dim=-1)


class ProjectionFreeAttention(nn.Module):
    """Multi-head attention without input projections.

    Queries and keys have ``qk_dim`` channels, values ``value_dim``; both are cut
    into ``num_heads`` heads, scores are divided by ``sqrt(qk_dim / num_heads)``,
    and the heads' values are joined and projected by ``out_proj`` (value_dim ->
    value_dim), the only parameters.
    """

    def __init__(self, qk_dim: int, value_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        for name, dim in (("qk_dim", qk_dim), ("value_dim", value_dim)):
            if dim % num_heads:
                raise ValueError(f"num_heads ({num_heads}) must divide {name} ({dim})")
        self.qk_dim, self.value_dim, self.num_heads, self.dropout = qk_dim, value_dim, num_heads, dropout
        self.out_proj = nn.Linear(value_dim, value_dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
        """query (B, Lq, qk_dim), key (B, Lk, qk_dim), value (B, Lk, value_dim),
        key_padding_mask (B, Lk) bool (True = padding), attn_mask (Lq, Lk) bool (True = blocked)
        -> (B, Lq, value_dim)."""
        if query.shape[-1] != self.qk_dim or key.shape[-1] != self.qk_dim or value.shape[-1] != self.value_dim:
            raise ValueError(f"query/key need {self.qk_dim} channels and value {self.value_dim}, got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        q, k, v = (x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for x in (query, key, value))
        out, _ = scaled_dot_product_attention(q, k, v, key_padding_mask, attn_mask,
                                              dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # heads side by side


def concat_heads(content: Tensor, position: Tensor, num_heads: int) -> Tensor:
    """(B, L, d) and (B, L, d) -> (B, L, 2d): each head's content channels, then its position channels."""
    return torch.cat([content.unflatten(-1, (num_heads, -1)), position.unflatten(-1, (num_heads, -1))],
                     dim=-1).flatten(-2)


class ConditionalDecoderLayer(_LayerBase):
    """Decoder layer of Conditional DETR: self-attention, conditional cross-attention, FFN (post-norm).

    ``ca_qpos_proj`` adds the positional query to the content query (and the key
    positions to the key content) as DETR does; the official decoder keeps it in
    its first layer only and sets it to ``None`` in the others.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 activation: str = "relu", normalize_before: bool = False) -> None:
        if normalize_before:
            raise ValueError("ConditionalDecoderLayer is post-norm only (normalize_before=False), as official")
        if d_model % nhead:
            raise ValueError(f"nhead ({nhead}) must divide d_model ({d_model})")
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                     "ca_qcontent_proj", "ca_qpos_proj", "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj",
                     "ca_qpos_sine_proj"):
            setattr(self, name, nn.Linear(d_model, d_model))
        self.cross_attn = ProjectionFreeAttention(2 * d_model, d_model, nhead, dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.nhead = nhead

    def _make_self_attn(self, d_model: int, nhead: int, dropout: float) -> nn.Module:
        return ProjectionFreeAttention(d_model, d_model, nhead, dropout)

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor, query_sine_embed: Tensor,
                memory_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                tgt_mask: Optional[Tensor] = None) -> Tensor:
        """tgt (B, Q, d) content queries, memory (B, HW, d), query_pos (B, Q, d) positional
        queries, query_sine_embed (B, Q, d) the spatial query before ``ca_qpos_sine_proj``,
        memory_key_padding_mask (B, HW), pos (B, HW, d), tgt_mask (Q, Q) bool, True = the
        self-attention of that query to that one is blocked (DN-DETR's denoising groups) -> (B, Q, d)."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=tgt_mask)))
        cross = self.cross_attention(tgt, memory, query_pos, query_sine_embed, memory_key_padding_mask, pos)
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))

    def cross_attention(self, tgt: Tensor, memory: Tensor, query_pos: Tensor, query_sine_embed: Tensor,
                        memory_key_padding_mask: Optional[Tensor] = None,
                        pos: Optional[Tensor] = None) -> Tensor:
        """The conditional cross-attention sublayer alone (before dropout, residual and norm)."""
        if pos is None:
            raise ValueError("pos (B, HW, d), the memory's positional encoding, is required")
        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:  # DETR's additive positions, kept where this map exists
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q = concat_heads(q, self.ca_qpos_sine_proj(query_sine_embed), self.nhead)  # (B, Q, 2d)
        k = concat_heads(k, k_pos, self.nhead)  # (B, HW, 2d)
        return self.cross_attn(q, k, self.ca_v_proj(memory), memory_key_padding_mask)
