"""Conditional DETR (Meng et al., 2021): DETR whose decoder queries look where a reference point says.

What changes from DETR (everything else -- backbone, encoder, image positions -- is DETR's)::

    query_embed (Q, d) = positional queries p_q; content queries start at zero, as in DETR
    reference s = sigmoid(ref_point_head(p_q))                      (B, Q, 2), once for all layers
    p_s = sine_embed_points(s)                                      (B, Q, d): (y, x) sinusoids
    layer l: spatial query = p_s * lambda_q, lambda_q = 1 (l = 0) | query_scale(output of l-1)
             cross-attention concatenates content and spatial parts per head (ConditionalDecoderLayer)
    box = sigmoid(bbox_embed(h_l) + [inverse_sigmoid(s), 0, 0])     centre relative to the reference
    logits = class_embed(h_l)                                       (B, Q, num_classes), sigmoid per class

The class head has no "no object" logit (focal loss, prior 0.01), and the last
box layer starts at zero, so every query starts centred on its reference point.
Parameter and buffer names equal the official ones (Atten4Vis/ConditionalDETR).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .backbone import Joiner, build_backbone
from .conditional_layers import ConditionalDecoderLayer, sine_embed_points
from .deformable_transformer import inverse_sigmoid
from .detr import DETR, MLP, build_position_embedding
from .transformer import Transformer, TransformerDecoder

__all__ = ["ConditionalDecoder", "ConditionalTransformer", "ConditionalDETR", "build_conditional_detr"]


class ConditionalDecoder(TransformerDecoder):
    """DETR's decoder with a reference point per query and conditional spatial queries.

    Always returns every layer's output (normalised by ``norm``) and the reference points.
    """

    def __init__(self, decoder_layer: ConditionalDecoderLayer, num_layers: int, norm: nn.Module,
                 d_model: int) -> None:
        super().__init__(decoder_layer, num_layers, norm, return_intermediate=True)
        if d_model % 4:
            raise ValueError(f"d_model must be a multiple of 4 (sines and cosines of y and x), got {d_model}")
        self.d_model = d_model
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)
        for layer in self.layers[1:]:  # only the first layer adds the positional query
            layer.ca_qpos_proj = None

    def scale(self, layer_id: int, output: Tensor) -> Union[float, Tensor]:
        """lambda_q: 1 for the first layer, else ``query_scale`` of the previous layer's output (B, Q, d)."""
        return 1.0 if layer_id == 0 else self.query_scale(output)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """tgt (B, Q, d), memory (B, HW, d), query_pos (B, Q, d) -> hs (layers, B, Q, d), reference (B, Q, 2)."""
        reference = self.ref_point_head(query_pos).sigmoid()  # (B, Q, 2) as (x, y)
        sine = sine_embed_points(reference, self.d_model // 2)  # (B, Q, d)
        hs = []
        for layer_id, layer in enumerate(self.layers):
            tgt = layer(tgt, memory, query_pos, sine * self.scale(layer_id, tgt),
                        memory_key_padding_mask=memory_key_padding_mask, pos=pos)
            hs.append(self.norm(tgt))
        return torch.stack(hs), reference


class ConditionalTransformer(Transformer):
    """DETR's transformer with the conditional decoder (post-norm only, as official).

    ``forward(src, mask, query_embed, pos_embed)`` as DETR's, returning
    ``hs`` (layers, B, Q, d) and the reference points (B, Q, 2).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu") -> None:
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
                         activation, normalize_before=False, return_intermediate_dec=True)

    @staticmethod
    def _make_decoder(layer_args: tuple, num_layers: int, return_intermediate: bool) -> nn.Module:
        d_model = layer_args[0]
        return ConditionalDecoder(ConditionalDecoderLayer(*layer_args), num_layers, nn.LayerNorm(d_model), d_model)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor,
                pos_embed: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, d, H, W), mask (B, H, W), query_embed (Q, d), pos_embed (B, d, H, W)
        -> hs (layers, B, Q, d), reference (B, Q, 2)."""
        self._check_inputs(src, mask, query_embed, pos_embed)
        memory, mask, pos = self._encode(src, mask, pos_embed)
        query_pos = query_embed[None].expand(src.shape[0], -1, -1)  # (B, Q, d)
        return self.decoder(torch.zeros_like(query_pos), memory, memory_key_padding_mask=mask,
                            pos=pos, query_pos=query_pos)


class ConditionalDETR(DETR):
    """Conditional DETR: DETR's model with a sigmoid class head and boxes relative to reference points.

    Args: as :class:`DETR`, with a ``ConditionalTransformer``; ``num_classes`` is the
    number of logits (91 for COCO: ids 1..90, no "no object" logit).
    """

    inverse_sigmoid_eps = 1e-5  # as official (util/misc.py)

    def __init__(self, backbone: Joiner, transformer: ConditionalTransformer, num_classes: int,
                 num_queries: int, aux_loss: bool = True) -> None:
        super().__init__(backbone, transformer, num_classes, num_queries, aux_loss)
        self.class_embed = nn.Linear(transformer.d_model, num_classes)  # one sigmoid per class
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)  # start on the reference point
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, images: Tensor, mask: Optional[Tensor] = None) -> dict:
        """images (B, 3, H, W), mask (B, H, W) True on padding -> dict with ``pred_logits``
        (B, Q, num_classes), ``pred_boxes`` (B, Q, 4) as (cx, cy, w, h) and ``aux_outputs``."""
        hs, reference = self.transformer(*self._transformer_inputs(images, mask, self.query_embed.weight))
        delta = self.bbox_embed(hs)  # (L, B, Q, 4)
        centre = delta[..., :2] + inverse_sigmoid(reference, self.inverse_sigmoid_eps)
        boxes = torch.cat([centre, delta[..., 2:]], dim=-1).sigmoid()
        return self._outputs(self.class_embed(hs), boxes)


def build_conditional_detr(backbone: Union[str, nn.Module] = "resnet50", num_classes: int = 91,
                           hidden_dim: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                           dim_feedforward: int = 2048, num_queries: int = 300, dropout: float = 0.1,
                           aux_loss: bool = True, position_embedding: str = "sine", train_backbone: bool = True,
                           dilation: bool = False, backbone_weights: Optional[str] = None,
                           small_widths: Sequence[int] = (32, 64, 128),
                           small_strides: Sequence[int] = (2, 2, 2)) -> ConditionalDETR:
    """Conditional DETR with the defaults of the official ``main.py`` (R50: 43,418,401 parameters):
    300 queries, 6 + 6 layers, d 256, 8 heads, FFN 2048, dropout 0.1. Arguments as :func:`build_detr`."""
    backbone = build_backbone(backbone, train_backbone=train_backbone, dilation=dilation, weights=backbone_weights,
                              small_widths=small_widths, small_strides=small_strides)
    position = build_position_embedding(position_embedding, hidden_dim)
    transformer = ConditionalTransformer(d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers,
                                         num_decoder_layers=dec_layers, dim_feedforward=dim_feedforward,
                                         dropout=dropout)
    return ConditionalDETR(Joiner(backbone, position), transformer, num_classes=num_classes,
                           num_queries=num_queries, aux_loss=aux_loss)
