"""DINO (Zhang et al., 2023) as a diff of the book's Deformable DETR.

::

    images --Deformable DETR's backbone, input projection, encoder--> memory (B, S, d)
        mixed query selection: one proposal per encoder pixel, scored by ``enc_out_class_embed``;
            the top-Q boxes become the decoder's anchors (detached), the content queries are
            learned (``tgt_embed``, Q x d)
        contrastive denoising (training): noised copies of the targets (positive and negative)
            are put in front of the Q queries, behind an attention mask
        decoder: per layer the query position is ``ref_point_head(sine(anchor box))``; each layer
            refines the box, "looking forward twice"
        -> pred_logits (B, Q, K), pred_boxes (B, Q, 4), aux_outputs, interm_outputs, dn_meta

What changes against :mod:`.deformable_detr` (everything else is reused as is):

* ``DINOTransformer``: Deformable DETR's transformer with a learned content query per proposal
  instead of ``pos_trans``, and the top-k taken over the best class of every proposal, not class 0.
* ``DINODecoder``: the query position comes from the 4-d reference box (as DAB-DETR), the outputs
  go through a final LayerNorm, and the refined box of layer l is handed to layer l's prediction
  *undetached* (so layer l+1's loss reaches layer l's box head) while layer l+1 starts from it detached.
* ``DINO``: the denoising queries of :mod:`detr_tutorial.denoising`; one class head and one box head
  shared by all decoder layers and separate copies for the encoder proposals.

Parameter names and the outputs follow the official ``models/dino`` (IDEA-Research/DINO), so its
checkpoints load with ``strict=True``. DINO's ``inverse_sigmoid`` clamps at 1e-3 (Deformable DETR: 1e-5).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import denoising  # a module, not its names: denoising imports models.deformable_transformer
from .backbone import Joiner, build_backbone
from .attention import MultiheadAttention
from .conditional_layers import sine_embed_points
from .deformable_detr import DeformableDETR
from .deformable_transformer import DeformableTransformer, DeformableTransformerDecoder, inverse_sigmoid
from .detr import MLP
from .position_encoding import PositionEmbeddingSine

__all__ = ["DINO", "DINOTransformer", "DINODecoder", "build_dino"]

EPS = 1e-3  # DINO's inverse_sigmoid eps (util/misc.py)


class MaskedSelfAttention(MultiheadAttention):
    """The decoder layers' self-attention with a mask set by :class:`DINODecoder` before each pass: the
    denoising groups (``attn_mask`` (T, T) bool, True = blocked), so Deformable DETR's layer is reused as is."""

    attn_mask: Optional[Tensor] = None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
        return super().forward(query, key, value, attn_mask=self.attn_mask, **kwargs)


class DINODecoder(DeformableTransformerDecoder):
    """Deformable DETR's decoder with DAB-style query positions and "look forward twice".

    ``bbox_embed`` (one head per layer, possibly the same module) is set by :class:`DINO`.
    """

    def __init__(self, layer: nn.Module, num_layers: int, d_model: int):
        super().__init__(layer, num_layers)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start: Tensor, ratios: Tensor, padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor]]:
        """
        Args:
            tgt: content queries ``(B, T, d)``; reference_points: boxes ``(B, T, 4)`` in [0, 1];
            memory ``(B, S, d)``, spatial_shapes, level_start, ratios ``(B, L, 2)``, padding_mask ``(B, S)``
                as for Deformable DETR; attn_mask: ``(T, T)`` bool, True = blocked.

        Returns:
            ``hs (layers, B, T, d)`` after the final LayerNorm and ``layers + 1`` reference boxes
            ``(B, T, 4)``: the first input and each layer's refined box, *not* detached.
        """
        outputs, references = [], [reference_points]
        half = self.norm.normalized_shape[0] // 2
        for lid, layer in enumerate(self.layers):
            ref_input = reference_points[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]  # (B, T, L, 4)
            query_pos = self.ref_point_head(sine_embed_points(ref_input[:, :, 0], half))
            layer.self_attn.attn_mask = attn_mask
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, level_start, padding_mask)
            refined = (self.bbox_embed[lid](tgt) + inverse_sigmoid(reference_points, EPS)).sigmoid()
            reference_points = refined.detach()  # layer l+1 starts from a detached box ...
            references.append(refined)  # ... but predicts relative to the undetached one: look forward twice
            outputs.append(self.norm(tgt))
        return torch.stack(outputs), references


class DINOTransformer(DeformableTransformer):
    """Deformable DETR's encoder and deformable layers; mixed query selection; :class:`DINODecoder`.

    ``enc_out_class_embed`` / ``enc_out_bbox_embed`` (the proposal heads) are set by :class:`DINO`.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 num_queries: int = 900):
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
                         num_feature_levels, dec_n_points, enc_n_points, two_stage=True,
                         two_stage_num_proposals=num_queries)
        del self.pos_trans, self.pos_trans_norm  # DINO learns the content queries instead
        layer = self.decoder.layers[0]
        layer.self_attn = MaskedSelfAttention(d_model, nhead, dropout)
        self.decoder = DINODecoder(layer, num_decoder_layers, d_model)
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_out_class_embed: Optional[nn.Module] = None
        self.enc_out_bbox_embed: Optional[nn.Module] = None
        self._reset_parameters()  # as official: Xavier also for the new matrices (tgt_embed included)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                dn_bbox: Optional[Tensor] = None, dn_label: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]:
        """
        Args:
            srcs, masks, pos_embeds: per level, as :meth:`DeformableTransformer.forward`;
            dn_bbox ``(B, P, 4)`` unsigmoided and dn_label ``(B, P, d)``: denoising queries put in front
            of the Q selected ones (or None); attn_mask ``(P + Q, P + Q)``.

        Returns:
            ``hs (layers, B, P + Q, d)``, references (``layers + 1`` of ``(B, P + Q, 4)``), the selected
            proposals' memory ``(B, Q, d)`` and refined boxes ``(B, Q, 4)`` (both undetached, for the
            ``interm_outputs`` loss) and their unrefined boxes ``(B, Q, 4)``.
        """
        memory, mask_flat, spatial_shapes, starts, ratios = self.encode(srcs, masks, pos_embeds)
        out_memory, proposals = self.encoder_proposals(memory, mask_flat, spatial_shapes)
        enc_class = self.enc_out_class_embed(out_memory)  # (B, S, K)
        enc_coord = self.enc_out_bbox_embed(out_memory) + proposals  # (B, S, 4) unsigmoided
        top = torch.topk(enc_class.max(-1)[0], self.two_stage_num_proposals, dim=1)[1]  # (B, Q)
        top_coords = torch.gather(enc_coord, 1, top[..., None].expand(-1, -1, 4))
        init_box_proposal = torch.gather(proposals, 1, top[..., None].expand(-1, -1, 4)).sigmoid()
        top_memory = torch.gather(out_memory, 1, top[..., None].expand(-1, -1, memory.shape[-1]))

        refpoints = top_coords.detach()  # positions from the encoder ...
        tgt = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)  # ... content learned
        if dn_bbox is not None:
            refpoints, tgt = torch.cat([dn_bbox, refpoints], 1), torch.cat([dn_label, tgt], 1)
        hs, references = self.decoder(tgt, refpoints.sigmoid(), memory, spatial_shapes, starts, ratios,
                                      mask_flat, attn_mask)
        return hs, references, top_memory, top_coords.sigmoid(), init_box_proposal


class DINO(DeformableDETR):
    """DINO: Deformable DETR's multi-scale input, :class:`DINOTransformer`, contrastive denoising.

    Args:
        backbone, num_feature_levels: as :class:`DeformableDETR`.
        transformer: a :class:`DINOTransformer`.
        num_classes: logits per query (91 for COCO).
        num_queries: selected proposals (900).
        dn_number, dn_label_noise_ratio, dn_box_noise_scale: :func:`detr_tutorial.denoising.prepare_for_cdn`
            (config 100, 0.5, 0.4; the official training scripts pass a box noise scale of 1.0).
        dn_labelbook_size: rows of ``label_enc`` minus one (91).
    """

    @property
    def takes_targets(self) -> bool:
        """Whether the Trainer passes the targets in training (the denoising queries are made from them): not
        with ``dn_number`` 0, as the official ``main.py`` (``--use_dn`` off sets ``dn_number`` 0 and passes none)."""
        return self.dn_number > 0

    def __init__(self, backbone: Joiner, transformer: DINOTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int = 4, dn_number: int = 100, dn_label_noise_ratio: float = 0.5,
                 dn_box_noise_scale: float = 0.4, dn_labelbook_size: int = 91):
        if dn_labelbook_size < num_classes:
            raise ValueError(f"dn_labelbook_size ({dn_labelbook_size}) must be at least num_classes "
                             f"({num_classes}): label_enc embeds every label")
        # one class head and one box head shared by all decoder layers (w, h bias 0, not -2)
        super().__init__(backbone, transformer, num_classes, num_queries, num_feature_levels, aux_loss=True)
        del self.query_embed
        nn.init.zeros_(self.bbox_embed[0].layers[-1].bias)
        transformer.decoder.bbox_embed = self.bbox_embed
        transformer.decoder.class_embed = self.class_embed
        transformer.enc_out_bbox_embed = copy.deepcopy(self.bbox_embed[0])
        transformer.enc_out_class_embed = copy.deepcopy(self.class_embed[0])
        self.label_enc = nn.Embedding(dn_labelbook_size + 1, transformer.d_model)
        self.dn_number, self.dn_label_noise_ratio = dn_number, dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale

    def forward(self, images: Tensor, mask: Optional[Tensor] = None,
                targets: Optional[Sequence[dict[str, Tensor]]] = None,
                generator: Optional[torch.Generator] = None) -> dict:
        """Detect objects; with ``targets`` in training mode, also denoise their noised copies.

        Args:
            images: ``(B, 3, H, W)``; mask: ``(B, H, W)`` True on padding (None = no padding);
            targets: B dicts with ``labels (n,)`` and normalised ``boxes (n, 4)`` (used in training only);
            generator: source of the denoising noise (default: the global generator, as official).

        Returns:
            dict with ``pred_logits (B, Q, K)``, ``pred_boxes (B, Q, 4)``, ``aux_outputs`` (earlier layers),
            ``interm_outputs`` and ``interm_outputs_for_matching_pre`` (the selected proposals, refined and
            not) and ``dn_meta`` (None without denoising; else ``pad_size``, ``num_dn_group`` and the
            denoising slots' outputs ``output_known_lbs_bboxes``).
        """
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        srcs, masks, pos = self.multi_scale(images, mask)
        dn_label = dn_bbox = attn_mask = dn_meta = None
        if self.training and targets is not None:
            if len(targets) != images.shape[0]:
                raise ValueError(f"targets must hold one dict per image ({images.shape[0]}), got {len(targets)}")
            dn_label, dn_bbox, attn_mask, dn_meta = denoising.prepare_for_cdn(
                targets, self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale, self.num_queries,
                self.num_classes, self.transformer.d_model, self.label_enc, generator)
        hs, references, hs_enc, ref_enc, init_box_proposal = self.transformer(srcs, masks, pos, dn_bbox,
                                                                              dn_label, attn_mask)
        hs = torch.cat([hs[:1] + self.label_enc.weight[0, 0] * 0.0, hs[1:]])  # label_enc in the graph always
        boxes = torch.stack([(head(h) + inverse_sigmoid(ref, EPS)).sigmoid()
                             for head, h, ref in zip(self.bbox_embed, hs, references[:-1])])
        logits = torch.stack([head(h) for head, h in zip(self.class_embed, hs)])
        logits, boxes = denoising.dn_post_process(logits, boxes, dn_meta, self.aux_loss)
        interm_class = self.transformer.enc_out_class_embed(hs_enc)
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
                "aux_outputs": [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])],
                "interm_outputs": {"pred_logits": interm_class, "pred_boxes": ref_enc},
                "interm_outputs_for_matching_pre": {"pred_logits": interm_class, "pred_boxes": init_box_proposal},
                "dn_meta": dn_meta}


def build_dino(num_classes: int = 91, backbone: Union[str, nn.Module] = "resnet50", hidden_dim: int = 256,
               nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048,
               num_queries: int = 900, dropout: float = 0.0, num_feature_levels: int = 4,
               enc_n_points: int = 4, dec_n_points: int = 4, dn_number: int = 100,
               dn_label_noise_ratio: float = 0.5, dn_box_noise_scale: float = 0.4,
               dn_labelbook_size: Optional[int] = None, train_backbone: bool = True,
               backbone_weights: Optional[str] = None, small_widths: Sequence[int] = (32, 64, 128),
               small_strides: Sequence[int] = (2, 2, 2)) -> DINO:
    """Build DINO-4scale with the settings of the official ``config/DINO/DINO_4scale.py`` (R50 layer2-4 +
    one stride-2 level, 900 queries, 6 + 6 layers, FFN 2048, dropout 0, image positions with temperature
    20 and no -0.5 offset, denoising 100 / 0.5 / 0.4, ``dn_labelbook_size`` = ``num_classes`` = 91).

    Args: as :func:`build_deformable_detr`, plus the denoising settings of :class:`DINO`
    (``dn_labelbook_size`` None = ``num_classes``).
    """
    if hidden_dim % 2:
        raise ValueError(f"hidden_dim must be even (half the channels encode y, half x), got {hidden_dim}")
    backbone = build_backbone(backbone, train_backbone=train_backbone, return_interm_layers=num_feature_levels > 1,
                              weights=backbone_weights, small_widths=small_widths, small_strides=small_strides)
    position = PositionEmbeddingSine(hidden_dim // 2, temperature=20, normalize=True)
    transformer = DINOTransformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout,
                                  num_feature_levels, dec_n_points, enc_n_points, num_queries)
    return DINO(Joiner(backbone, position), transformer, num_classes, num_queries, num_feature_levels,
                dn_number, dn_label_noise_ratio, dn_box_noise_scale,
                num_classes if dn_labelbook_size is None else dn_labelbook_size)
