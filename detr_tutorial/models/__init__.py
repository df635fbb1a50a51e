"""Models of the DETR family: backbones, positional encodings, attention, transformers."""
from .attention import MultiheadAttention, scaled_dot_product_attention
from .backbone import Joiner, ResNetBackbone, SmallBackbone, downsample_mask
from .deformable_attention import MSDeformAttn
from .deformable_detr import DeformableDETR, build_deformable_detr
from .deformable_transformer import DeformableTransformer
from .detr import DETR, MLP, build_detr
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer)
from .conditional_detr import ConditionalDETR, ConditionalTransformer, build_conditional_detr
from .conditional_layers import ConditionalDecoderLayer, ProjectionFreeAttention, sine_embed_points
from .dab_detr import DABDETR, DABTransformer, build_dab_detr
from .detr3d_geometry import box_corners, denormalize_bbox, feature_sampling, normalize_bbox, project_points
from .dn_detr import DNDETR, build_dn_detr
from .detr3d import DETR3D, Detr3DCrossAtten, Detr3DDecoderLayer, build_detr3d
from .dino import DINO, build_dino
