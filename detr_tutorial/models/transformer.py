"""DETR's encoder-decoder transformer.

The standard transformer of "Attention is all you need" with DETR's changes:

* positional encodings are added to the queries and keys of *every*
  attention layer (never to the values), instead of once to the input;
* the decoder input ``tgt`` starts at zero: the learned object queries enter
  only as ``query_pos``, the positional encoding of the decoder;
* the decoder returns the output of every layer, each passed through the
  final ``decoder.norm`` (for the auxiliary losses);
* there is no final encoder norm in the default post-norm configuration.

Submodule names equal the official ones (``encoder.layers.N.self_attn``,
``linear1``, ``norm1``, ``decoder.layers.N.multihead_attn``, ``norm3``,
``decoder.norm`` ...), so official state dicts load unchanged. Internally
everything is batch-first: sequences are (B, L, d).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiheadAttention

__all__ = ["Transformer", "TransformerEncoder", "TransformerDecoder",
           "TransformerEncoderLayer", "TransformerDecoderLayer"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # and "prelu": one learned slope per layer (nn.PReLU)


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


class _LayerBase(nn.Module):
    """What encoder and decoder layers share: self-attention, feed-forward network, two norms."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 activation: str, normalize_before: bool) -> None:
        super().__init__()
        if activation not in (*_ACTIVATIONS, "prelu"):
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS) + ['prelu']}, got {activation!r}")
        self.self_attn = self._make_self_attn(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.PReLU() if activation == "prelu" else _ACTIVATIONS[activation]
        self.normalize_before = normalize_before

    def _make_self_attn(self, d_model: int, nhead: int, dropout: float) -> nn.Module:
        """The self-attention module (subclasses may swap in another kind)."""
        return MultiheadAttention(d_model, nhead, dropout=dropout)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class TransformerEncoderLayer(_LayerBase):
    """Self-attention over the feature map, then a feed-forward network.

    Post-norm (default): ``x = norm(x + sublayer(x))``.
    Pre-norm (``normalize_before=True``): ``x = x + sublayer(norm(x))``.
    """

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None) -> Tensor:
        """src (B, HW, d), src_key_padding_mask (B, HW) bool, pos (B, HW, d) -> (B, HW, d)."""
        if self.normalize_before:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=src_key_padding_mask)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = k = _with_pos(src, pos)  # positions on queries and keys, not on values
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask=src_key_padding_mask)[0]))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(_LayerBase):
    """Self-attention among the queries, cross-attention to the memory, feed-forward."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 activation: str, normalize_before: bool) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor,
                memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None) -> Tensor:
        """tgt (B, Q, d), memory (B, HW, d), memory_key_padding_mask (B, HW),
        pos (B, HW, d), query_pos (B, Q, d) -> (B, Q, d)."""
        pre = self.normalize_before
        x = self.norm1(tgt) if pre else tgt
        q = k = _with_pos(x, query_pos)
        tgt = tgt + self.dropout1(self.self_attn(q, k, x)[0])
        if not pre:
            tgt = self.norm1(tgt)
        x = self.norm2(tgt) if pre else tgt
        tgt = tgt + self.dropout2(self.multihead_attn(
            _with_pos(x, query_pos), _with_pos(memory, pos), memory,
            key_padding_mask=memory_key_padding_mask)[0])
        if not pre:
            tgt = self.norm2(tgt)
        x = self.norm3(tgt) if pre else tgt
        tgt = tgt + self.dropout3(self._ffn(x))
        return tgt if pre else self.norm3(tgt)


class TransformerEncoder(nn.Module):
    """``num_layers`` copies of an encoder layer, optional final norm (pre-norm only)."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int,
                 norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None) -> Tensor:
        """(B, HW, d) -> memory (B, HW, d)."""
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """``num_layers`` copies of a decoder layer and the final ``norm``.

    With ``return_intermediate`` the output of every layer is normalised by
    ``norm`` and stacked to (num_layers, B, Q, d); otherwise only the last,
    as (1, B, Q, d).
    """

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int, norm: nn.Module,
                 return_intermediate: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None) -> Tensor:
        """tgt (B, Q, d), memory (B, HW, d) -> (num_layers or 1, B, Q, d)."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=memory_key_padding_mask,
                        pos=pos, query_pos=query_pos)
            if self.return_intermediate:
                intermediate.append(self.norm(tgt))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return self.norm(tgt)[None]


class Transformer(nn.Module):
    """DETR's transformer, with the official constructor and forward signature.

    Args:
        d_model: channels of every token.
        nhead: attention heads.
        num_encoder_layers, num_decoder_layers: depths.
        dim_feedforward: hidden width of the feed-forward networks.
        dropout: dropout in attention weights, after each sublayer and in the FFN.
        activation: "relu" (DETR) or "gelu".
        normalize_before: pre-norm layers (adds a final encoder norm).
        return_intermediate_dec: return every decoder layer's output (DETR's
            model builds it with True, for the auxiliary losses).
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False,
                 return_intermediate_dec: bool = False) -> None:
        super().__init__()
        if num_decoder_layers < 1:
            raise ValueError(f"num_decoder_layers must be >= 1, got {num_decoder_layers}")
        args = (d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.encoder = self._make_encoder(args, num_encoder_layers)
        self.decoder = self._make_decoder(args, num_decoder_layers, return_intermediate_dec)
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead

    @staticmethod
    def _make_encoder(layer_args: tuple, num_layers: int) -> nn.Module:
        """``layer_args`` = (d_model, nhead, dim_feedforward, dropout, activation, normalize_before)."""
        d_model, normalize_before = layer_args[0], layer_args[-1]
        return TransformerEncoder(TransformerEncoderLayer(*layer_args), num_layers,
                                  nn.LayerNorm(d_model) if normalize_before else None)

    @staticmethod
    def _make_decoder(layer_args: tuple, num_layers: int, return_intermediate: bool) -> nn.Module:
        return TransformerDecoder(TransformerDecoderLayer(*layer_args), num_layers, nn.LayerNorm(layer_args[0]),
                                  return_intermediate=return_intermediate)

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor,
                pos_embed: Tensor) -> tuple[Tensor, Tensor]:
        """Encode the feature map, decode the object queries.

        Args:
            src: (B, d, H, W) projected backbone features.
            mask: (B, H, W) bool, True = padding.
            query_embed: (Q, d) object queries (``query_embed.weight`` of DETR).
            pos_embed: (B, d, H, W) positional encoding of ``src``.

        Returns:
            ``hs`` (num_decoder_layers or 1, B, Q, d) decoder outputs and
            ``memory`` (B, d, H, W) encoder output.
        """
        self._check_inputs(src, mask, query_embed, pos_embed)
        b, c, h, w = src.shape
        memory, mask, pos_embed = self._encode(src, mask, pos_embed)
        query_pos = query_embed[None].expand(b, -1, -1)  # (B, Q, d)
        tgt = torch.zeros_like(query_pos)  # the decoder starts from nothing but the query positions
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_pos)
        return hs, memory.transpose(1, 2).reshape(b, c, h, w)

    def _encode(self, src: Tensor, mask: Tensor, pos_embed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flatten the maps to sequences and encode: src (B, d, H, W), mask (B, H, W), pos_embed
        (B, d, H, W) -> memory (B, HW, d), mask (B, HW), pos (B, HW, d)."""
        src = src.flatten(2).transpose(1, 2)  # (B, HW, d)
        pos_embed = pos_embed.flatten(2).transpose(1, 2)  # (B, HW, d)
        mask = mask.flatten(1)  # (B, HW)
        return self.encoder(src, src_key_padding_mask=mask, pos=pos_embed), mask, pos_embed

    def _check_inputs(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
                      query_width: Optional[int] = None) -> None:
        """Raise unless the shapes fit; ``query_embed`` must be (Q, query_width), default (Q, d_model)."""
        if src.dim() != 4 or src.shape[1] != self.d_model:
            raise ValueError(f"src must have shape (B, {self.d_model}, H, W), got {tuple(src.shape)}")
        if pos_embed.shape != src.shape:
            raise ValueError(f"pos_embed must have the shape of src {tuple(src.shape)}, "
                             f"got {tuple(pos_embed.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = padding), got {mask.dtype}")
        if mask.shape != (src.shape[0], *src.shape[2:]):
            raise ValueError(f"mask must have shape {(src.shape[0], *src.shape[2:])}, got {tuple(mask.shape)}")
        query_width = self.d_model if query_width is None else query_width
        if query_embed.dim() != 2 or query_embed.shape[1] != query_width:
            raise ValueError(f"query_embed must have shape (Q, {query_width}), got {tuple(query_embed.shape)}")
