"""The DETR model: backbone + transformer + prediction heads.

::

    images (B, 3, H, W) --backbone--> features (B, C, H/32, W/32), mask, pos
            --input_proj (1x1 conv)--> (B, d, h, w)
            --transformer(query_embed)--> hs (L, B, Q, d)
            --class_embed--> logits (L, B, Q, num_classes + 1)
            --bbox_embed (3-layer MLP) + sigmoid--> boxes (L, B, Q, 4), (cx, cy, w, h) in [0, 1]

The last decoder layer gives ``pred_logits``/``pred_boxes``; the earlier ones
give ``aux_outputs`` for the auxiliary losses.

``num_classes`` follows the official convention: it is *one more than the
largest class id* (91 for COCO, whose ids run 1..90), and the class head has
``num_classes + 1`` outputs, the last one meaning "no object".
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Joiner, build_backbone
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .transformer import Transformer

__all__ = ["MLP", "DETR", "build_detr", "build_position_embedding"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head).

    (..., input_dim) -> (..., output_dim); layers are named ``layers.0`` ... as official.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    """DEtection TRansformer.

    Args:
        backbone: a ``Joiner`` (backbone + positional encoding); DETR uses its
            last (coarsest) level.
        transformer: a ``Transformer`` built with ``return_intermediate_dec=True``
            when ``aux_loss`` is wanted.
        num_classes: largest class id + 1; the class head has ``num_classes + 1``
            outputs, the last one being "no object".
        num_queries: object queries = the most objects one image can hold.
        aux_loss: also return the predictions of every earlier decoder layer.
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int,
                 num_queries: int, aux_loss: bool = False) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int (largest class id + 1), got {num_classes!r}")
        if not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, images: Tensor, mask: Optional[Tensor] = None) -> dict:
        """Detect objects.

        Args:
            images: (B, 3, H, W) float batch (see ``detr_tutorial.data.pad_images``).
            mask: (B, H, W) bool, True on padding; None = no padding.

        Returns:
            dict with ``pred_logits`` (B, Q, num_classes + 1), ``pred_boxes``
            (B, Q, 4) normalised (cx, cy, w, h), and with ``aux_loss`` also
            ``aux_outputs``: a list of such dicts for decoder layers 0..L-2.
        """
        hs = self.transformer(*self._transformer_inputs(images, mask, self.query_embed.weight))[0]  # (L, B, Q, d)
        outputs_class = self.class_embed(hs)  # (L, B, Q, K + 1)
        outputs_coord = self.bbox_embed(hs).sigmoid()  # (L, B, Q, 4)
        return self._outputs(outputs_class, outputs_coord)

    def _transformer_inputs(self, images: Tensor, mask: Optional[Tensor],
                            queries: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The transformer's arguments: the last backbone level projected to (B, d, h, w), its
        mask (B, h, w), ``queries`` and the level's positional encoding (B, d, h, w)."""
        features, pos = self.backbone(images, mask)
        src, mask = features[-1]  # (B, C, h, w), (B, h, w)
        return self.input_proj(src), mask, queries, pos[-1]

    def _outputs(self, outputs_class: Tensor, outputs_coord: Tensor) -> dict:
        """Per-layer logits (L, B, Q, K') and boxes (L, B, Q, 4) -> the output dict: the last
        layer, and the earlier ones as ``aux_outputs`` when ``aux_loss``."""
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b}
                                  for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out


def build_position_embedding(position_embedding: str, hidden_dim: int,
                             temperature: float = 10000) -> nn.Module:
    """The image features' positional encoding, ``hidden_dim // 2`` channels per axis:
    "sine" (normalised, with ``temperature``) or "learned"."""
    if hidden_dim % 2:
        raise ValueError(f"hidden_dim must be even (half the channels encode y, half x), got {hidden_dim}")
    if position_embedding == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, temperature=temperature, normalize=True)
    if position_embedding == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"position_embedding must be 'sine' or 'learned', got {position_embedding!r}")


def build_detr(backbone: Union[str, nn.Module] = "resnet50", num_classes: int = 91, hidden_dim: int = 256,
               nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6, dim_feedforward: int = 2048,
               num_queries: int = 100, dropout: float = 0.1, aux_loss: bool = True, pre_norm: bool = False,
               position_embedding: str = "sine", train_backbone: bool = True, dilation: bool = False,
               backbone_weights: Optional[str] = None, small_widths: Sequence[int] = (32, 64, 128),
               small_strides: Sequence[int] = (2, 2, 2)) -> DETR:
    """Build DETR with the official defaults (DETR-R50 for COCO: 41,524,768 parameters).

    Args:
        backbone: "resnet18", "resnet34", "resnet50", "resnet101", "small"
            (``SmallBackbone(small_widths, small_strides)``, trainable BatchNorm,
            for CPU training), or a built backbone module (``strides``,
            ``num_channels``, ``forward(images, mask)``).
        num_classes: largest class id + 1 (91 for COCO).
        hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout,
        pre_norm: transformer settings.
        num_queries: object queries.
        aux_loss: return ``aux_outputs``.
        position_embedding: "sine" (normalised, ``hidden_dim // 2`` per axis) or "learned".
        train_backbone, dilation, backbone_weights: ResNet options (see
            ``ResNetBackbone``); ``backbone_weights="IMAGENET1K_V1"`` plugs in
            torchvision's pretrained weights.
        small_widths, small_strides: ``SmallBackbone`` options.
    """
    backbone = build_backbone(backbone, train_backbone=train_backbone, dilation=dilation, weights=backbone_weights,
                              small_widths=small_widths, small_strides=small_strides)
    pos = build_position_embedding(position_embedding, hidden_dim)
    transformer = Transformer(d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers,
                              num_decoder_layers=dec_layers, dim_feedforward=dim_feedforward,
                              dropout=dropout, normalize_before=pre_norm, return_intermediate_dec=True)
    return DETR(Joiner(backbone, pos), transformer, num_classes=num_classes,
                num_queries=num_queries, aux_loss=aux_loss)
