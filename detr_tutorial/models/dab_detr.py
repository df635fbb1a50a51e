"""DAB-DETR (Liu et al., 2022): Conditional DETR whose queries are learned anchor boxes, refined layer by layer.

What changes from Conditional DETR (the decoder layer and its conditional
cross-attention are Conditional DETR's)::

    refpoint_embed (Q, 4) = anchors (cx, cy, w, h) before the sigmoid; content queries start at zero
    layer l, anchor A (after the sigmoid), S = sine_embed_points(A)      (B, Q, 2d): y, x, w, h
      positional query  p_q = ref_point_head(S)                          MLP(2d, d, d, 2), every layer
      spatial query     (y, x half of S) * lambda_q, then its y part * h_ref / A.h and its x part
                        * w_ref / A.w, (w_ref, h_ref) = sigmoid(ref_anchor_head(output))
      refined anchor    new = sigmoid(bbox_embed(output) + inverse_sigmoid(A))   all 4 coordinates
      next anchor       A_{l+1} = new.detach()
    box of layer l = sigmoid(bbox_embed(norm(h_l)) + inverse_sigmoid(R_l)),
                     R_0 = A_0, R_l = new of layer l-1 (NOT detached)

So layer l's box loss reaches layer l-1's box prediction through R_l, while the
next layer's queries see only the detached anchor. The encoder also differs:
before each layer the positions are rescaled by ``query_scale`` of the current
features, and the transformer uses PReLU and no dropout by default. The image
positions use temperature 20 (``main.py`` ``--pe_temperatureH/W``);
``inverse_sigmoid`` uses eps 1e-3. Names equal the official ones
(IDEA-Research/DAB-DETR, ``models/DAB_DETR``), including the box head's second
name ``transformer.decoder.bbox_embed``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .backbone import Joiner, build_backbone
from .conditional_detr import ConditionalDecoder, ConditionalDETR, ConditionalTransformer
from .conditional_layers import ConditionalDecoderLayer, sine_embed_points
from .deformable_transformer import inverse_sigmoid
from .detr import MLP, build_position_embedding
from .transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = ["DABEncoder", "DABDecoder", "DABTransformer", "DABDETR", "build_dab_detr"]

INVERSE_SIGMOID_EPS = 1e-3  # as official (util/misc.py of DAB-DETR)


class DABEncoder(TransformerEncoder):
    """DETR's encoder whose positional encoding is rescaled before each layer: ``pos * query_scale(x)``."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__(encoder_layer, num_layers)
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None) -> Tensor:
        """src (B, HW, d), src_key_padding_mask (B, HW), pos (B, HW, d) -> memory (B, HW, d)."""
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos * self.query_scale(src))
        return src


class DABDecoder(ConditionalDecoder):
    """Conditional DETR's decoder driven by 4-d anchors that every layer refines.

    ``bbox_embed`` (the model's box head, shared by all layers) must be set before use.
    """

    def __init__(self, decoder_layer: ConditionalDecoderLayer, num_layers: int, norm: nn.Module,
                 d_model: int) -> None:
        super().__init__(decoder_layer, num_layers, norm, d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)  # sine of the anchor -> positional query
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)  # reference width and height for the modulation
        self.bbox_embed: Optional[nn.Module] = None

    def spatial_query(self, layer_id: int, output: Tensor, anchors: Tensor, sine: Tensor) -> Tensor:
        """The modulated spatial query: (y, x) half of ``sine`` (B, Q, 2d) times lambda_q, its y
        part scaled by h_ref / h and its x part by w_ref / w of ``anchors`` (B, Q, 4) -> (B, Q, d)."""
        half = self.d_model // 2
        spatial = sine[..., :self.d_model] * self.scale(layer_id, output)
        ref_wh = self.ref_anchor_head(output).sigmoid()  # (B, Q, 2) as (w_ref, h_ref)
        y_scale = (ref_wh[..., 1] / anchors[..., 3])[..., None]
        x_scale = (ref_wh[..., 0] / anchors[..., 2])[..., None]
        return torch.cat([spatial[..., :half] * y_scale, spatial[..., half:] * x_scale], dim=-1)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, anchors: Optional[Tensor] = None,
                tgt_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """tgt (B, Q, d), memory (B, HW, d), anchors (B, Q, 4) in [0, 1], tgt_mask (Q, Q) bool for the
        self-attention (True = blocked) -> hs (layers, B, Q, d) and references (layers, B, Q, 4): the
        anchor each layer's box is relative to."""
        if self.bbox_embed is None:
            raise RuntimeError("DABDecoder.bbox_embed is not set; DABDETR shares its box head with the decoder")
        if anchors is None or anchors.dim() != 3 or anchors.shape[-1] != 4:
            raise ValueError("anchors must have shape (B, Q, 4) as (cx, cy, w, h), got "
                             f"{None if anchors is None else tuple(anchors.shape)}")
        references, hs = [anchors], []
        for layer_id, layer in enumerate(self.layers):
            sine = sine_embed_points(anchors, self.d_model // 2)  # (B, Q, 2d)
            tgt = layer(tgt, memory, self.ref_point_head(sine), self.spatial_query(layer_id, tgt, anchors, sine),
                        memory_key_padding_mask=memory_key_padding_mask, pos=pos, tgt_mask=tgt_mask)
            hs.append(self.norm(tgt))
            refined = (self.bbox_embed(tgt) + inverse_sigmoid(anchors, INVERSE_SIGMOID_EPS)).sigmoid()
            if layer_id < self.num_layers - 1:
                references.append(refined)  # kept in the graph: the next layer's box loss reaches this one
            anchors = refined.detach()  # the next layer's queries start from a constant anchor
        return torch.stack(hs), torch.stack(references)


class DABTransformer(ConditionalTransformer):
    """Conditional DETR's transformer with DAB's encoder and decoder; PReLU and no dropout by default.

    ``forward(src, mask, anchors, pos_embed)`` takes the learned anchors (Q, 4)
    before the sigmoid and returns ``hs`` (layers, B, Q, d) and the references
    (layers, B, Q, 4).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 activation: str = "prelu") -> None:
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
                         activation)

    @staticmethod
    def _make_encoder(layer_args: tuple, num_layers: int) -> nn.Module:
        return DABEncoder(TransformerEncoderLayer(*layer_args), num_layers, layer_args[0])

    @staticmethod
    def _make_decoder(layer_args: tuple, num_layers: int, return_intermediate: bool) -> nn.Module:
        d_model = layer_args[0]
        return DABDecoder(ConditionalDecoderLayer(*layer_args), num_layers, nn.LayerNorm(d_model), d_model)

    def forward(self, src: Tensor, mask: Tensor, anchors: Tensor, pos_embed: Tensor,
                tgt: Optional[Tensor] = None, tgt_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """src (B, d, H, W), mask (B, H, W), anchors (Q, 4) unsigmoided, pos_embed (B, d, H, W).

        DN-DETR's additions: per-image anchors (B, Q, 4) with ``tgt`` (B, Q, d), the content queries
        (zeros when None), and ``tgt_mask`` (Q, Q) bool for the decoder's self-attention (True = blocked)."""
        b = src.shape[0]
        self._check_inputs(src, mask, anchors if anchors.dim() == 2 else anchors[0], pos_embed, query_width=4)
        anchors = anchors.sigmoid().expand(b, -1, -1)  # (B, Q, 4)
        if tgt is None:
            tgt = src.new_zeros(b, anchors.shape[1], self.d_model)
        elif tgt.shape != (b, anchors.shape[1], self.d_model):
            raise ValueError(f"tgt must have shape {(b, anchors.shape[1], self.d_model)}, got {tuple(tgt.shape)}")
        memory, mask, pos = self._encode(src, mask, pos_embed)
        return self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos, anchors=anchors, tgt_mask=tgt_mask)


class DABDETR(ConditionalDETR):
    """DAB-DETR: Conditional DETR with learned anchor boxes ``refpoint_embed`` (Q, 4) instead of
    positional queries, and boxes relative to each layer's anchor (all four coordinates)."""

    inverse_sigmoid_eps = INVERSE_SIGMOID_EPS

    def __init__(self, backbone: Joiner, transformer: DABTransformer, num_classes: int,
                 num_queries: int, aux_loss: bool = True) -> None:
        super().__init__(backbone, transformer, num_classes, num_queries, aux_loss)
        del self.query_embed  # the anchors are the queries
        self.refpoint_embed = nn.Embedding(num_queries, 4)
        transformer.decoder.bbox_embed = self.bbox_embed  # one box head for the decoder's updates and the outputs

    def forward(self, images: Tensor, mask: Optional[Tensor] = None) -> dict:
        """images (B, 3, H, W), mask (B, H, W) True on padding -> dict as :class:`ConditionalDETR`."""
        hs, references = self.transformer(*self._transformer_inputs(images, mask, self.refpoint_embed.weight))
        boxes = (self.bbox_embed(hs) + inverse_sigmoid(references, self.inverse_sigmoid_eps)).sigmoid()
        return self._outputs(self.class_embed(hs), boxes)


def build_dab_detr(backbone: Union[str, nn.Module] = "resnet50", num_classes: int = 91, hidden_dim: int = 256,
                   nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048,
                   num_queries: int = 300, dropout: float = 0.0, activation: str = "prelu", aux_loss: bool = True,
                   position_embedding: str = "sine", pe_temperature: float = 20, train_backbone: bool = True,
                   dilation: bool = False, backbone_weights: Optional[str] = None,
                   small_widths: Sequence[int] = (32, 64, 128),
                   small_strides: Sequence[int] = (2, 2, 2)) -> DABDETR:
    """DAB-DETR with the defaults of the official ``main.py -m dab_detr`` (R50: 43,671,517 parameters):
    300 anchors, 6 + 6 layers, d 256, 8 heads, FFN 2048, dropout 0, PReLU, image positions with
    temperature 20. Arguments as :func:`build_conditional_detr`."""
    backbone = build_backbone(backbone, train_backbone=train_backbone, dilation=dilation, weights=backbone_weights,
                              small_widths=small_widths, small_strides=small_strides)
    position = build_position_embedding(position_embedding, hidden_dim, temperature=pe_temperature)
    transformer = DABTransformer(d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers,
                                 num_decoder_layers=dec_layers, dim_feedforward=dim_feedforward, dropout=dropout,
                                 activation=activation)
    return DABDETR(Joiner(backbone, position), transformer, num_classes=num_classes,
                   num_queries=num_queries, aux_loss=aux_loss)
