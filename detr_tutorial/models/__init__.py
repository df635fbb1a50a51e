"""Models of the DETR family: backbones, positional encodings, attention, transformers."""
from .attention import MultiheadAttention, scaled_dot_product_attention
from .backbone import Joiner, ResNetBackbone, SmallBackbone, downsample_mask
from .detr import DETR, MLP, build_detr
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer)
