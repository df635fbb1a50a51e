"""Scaled dot-product attention and multi-head attention, written out.

``MultiheadAttention`` computes the same function as
``torch.nn.MultiheadAttention(embed_dim, num_heads, dropout, batch_first=True)``
and stores its weights under the same names (``in_proj_weight``,
``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), so state dicts move
between the two -- and official DETR checkpoints load unchanged. Tensors are
batch-first: ``(B, L, E)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["scaled_dot_product_attention", "MultiheadAttention"]


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor,
                                 key_padding_mask: Optional[Tensor] = None,
                                 attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d)) v for every head.

    Args:
        q: (B, h, Lq, d) queries.
        k: (B, h, Lk, d) keys.
        v: (B, h, Lk, d) values.
        key_padding_mask: (B, Lk) bool, True = this key is padding and gets
            no attention.
        attn_mask: bool, broadcastable to (B, h, Lq, Lk), True = this
            query/key pair is blocked.
        dropout_p: dropout probability on the attention weights (pass 0.0 in eval).

    Returns:
        ``(output (B, h, Lq, d), weights (B, h, Lq, Lk))``; each row of
        ``weights`` sums to one over the keys that are not masked.
    """
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, h, Lq, Lk)
    blocked = None
    if key_padding_mask is not None:
        blocked = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
    if attn_mask is not None:
        blocked = attn_mask if blocked is None else blocked | attn_mask
    if blocked is not None:
        # reads tensor values, which torch.export cannot trace: eager mode only
        if not torch.compiler.is_exporting() and blocked.all(dim=-1).any():
            raise ValueError("key_padding_mask/attn_mask block every key for some query; "
                             "its softmax would be NaN")
        scores = scores.masked_fill(blocked, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


class MultiheadAttention(nn.Module):
    """Multi-head attention, batch-first, parameter names of ``nn.MultiheadAttention``.

    Queries, keys and values are projected by the three row blocks of
    ``in_proj_weight`` (3E, E), split into ``num_heads`` heads of E/num_heads
    channels, attended per head, concatenated and projected by ``out_proj``.

    Args:
        embed_dim: E, channels of queries, keys and values.
        num_heads: number of heads; must divide ``embed_dim``.
        dropout: dropout on the attention weights during training.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({embed_dim})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # the initialisation of nn.MultiheadAttention
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None,
                need_weights: bool = True,
                average_attn_weights: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """Attend from ``query`` (B, Lq, E) to ``key`` (B, Lk, E) / ``value`` (B, Lk, E).

        ``key_padding_mask`` (B, Lk) bool and ``attn_mask`` (bool, broadcastable
        to (B, h, Lq, Lk)) mark blocked keys with True.

        Returns ``(output (B, Lq, E), weights)`` with ``weights`` (B, Lq, Lk)
        averaged over heads, (B, h, Lq, Lk) if ``average_attn_weights=False``,
        or None if ``need_weights=False`` -- as ``nn.MultiheadAttention``.
        """
        self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q))  # (B, h, Lq, d)
        k = self._split_heads(F.linear(key, w_k, b_k))  # (B, h, Lk, d)
        v = self._split_heads(F.linear(value, w_v, b_v))  # (B, h, Lk, d)
        dropout_p = self.dropout if self.training else 0.0
        out, weights = scaled_dot_product_attention(q, k, v, key_padding_mask, attn_mask, dropout_p)
        out = out.transpose(1, 2).flatten(2)  # (B, Lq, E): heads side by side
        out = self.out_proj(out)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor,
                      key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]) -> None:
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3 or x.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} must have shape (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        if key.shape[:2] != value.shape[:2] or query.shape[0] != key.shape[0]:
            raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                             f"{tuple(value.shape)} must share B, and key/value must share L")
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be bool (True = blocked), got {attn_mask.dtype}")
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
            if key_padding_mask.shape != key.shape[:2]:
                raise ValueError(f"key_padding_mask must have shape {tuple(key.shape[:2])}, "
                                 f"got {tuple(key_padding_mask.shape)}")
