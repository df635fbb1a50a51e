"""Rename tables from Hugging Face ``transformers`` state dicts to the library's (official) names.

Each table is a list of ``(regex, replacement)`` applied in order to every key (see
:func:`detr_tutorial.hub.convert_hf_state_dict`); ``RULES`` holds one table per ``model_type`` of a
``config.json`` and ``RECIPES`` the name of the matching training recipe in
:data:`detr_tutorial.recipes.RECIPES` (its post-processing is the one :mod:`detr_tutorial.predict` uses).
"""
from __future__ import annotations

__all__ = ["RESNETS", "RULES", "RECIPES"]

#: transformers ResNet (layer type, depths) -> torchvision name
RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
           ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101"}

# renames shared by every architecture: backbone, position embedding, FFN, attention output
_COMMON = [
    (r"^model\.backbone\.(conv_encoder\.)?model\.", "backbone.0.body."),
    (r"^backbone\.0\.body\.embedder\.embedder\.convolution\.", "backbone.0.body.conv1."),
    (r"^backbone\.0\.body\.embedder\.embedder\.normalization\.", "backbone.0.body.bn1."),
    (r"^backbone\.0\.body\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"backbone.0.body.layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^backbone\.0\.body\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"backbone.0.body.layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^backbone\.0\.body\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
     lambda m: f"backbone.0.body.layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^backbone\.0\.body\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
     lambda m: f"backbone.0.body.layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
    (r"^model\.(backbone\.)?position_embedding\.row_embeddings\.", "backbone.1.row_embed."),
    (r"^model\.(backbone\.)?position_embedding\.column_embeddings\.", "backbone.1.col_embed."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),
    (r"\.(mlp\.)?fc2\.", ".linear2."),
    (r"\.o_proj\.", ".out_proj."),
    (r"^(transformer\.encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"^(transformer\.encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
]


def _dense_decoder(cross_attn: str) -> list:
    """Renames of DETR's and Conditional DETR's heads and post-norm decoder, whose cross-attention is
    called ``cross_attn`` in the library."""
    return _COMMON + [
        (r"^model\.input_projection\.", "input_proj."),
        (r"^class_labels_classifier\.", "class_embed."),
        (r"^bbox_predictor\.", "bbox_embed."),
        (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
        (r"^model\.decoder\.(query_scale|ref_point_head)\.", r"transformer.decoder.\1."),
        (r"^(transformer\.decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
        (r"^(transformer\.decoder\.layers\.\d+)\.encoder_attn\.", rf"\1.{cross_attn}."),
        (r"^(transformer\.decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
        (r"^(transformer\.decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    ]


_DEFORMABLE = _COMMON + [  # the official decoder layer: norm1 after cross-attention, norm2 after self-attention
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.(level_embed|reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\b",
     r"transformer.\1"),
    (r"^model\.decoder\.(class_embed|bbox_embed)\.", r"transformer.decoder.\1."),  # box refinement's heads
    (r"^(transformer\.decoder\.layers\.\d+)\.encoder_attn\.", r"\1.cross_attn."),
    (r"^(transformer\.decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm1."),
    (r"^(transformer\.decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm2."),
    (r"^(transformer\.decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
]

# DAB-DETR: transformers groups each decoder layer into self_attn / cross_attn / mlp blocks whose
# projections are the official sa_* / ca_* maps, e.g. self_attn.self_attn_query_content_proj -> sa_qcontent_proj
_DAB = _COMMON + [
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_refpoint_embeddings\.", "refpoint_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"^model\.encoder\.query_scale\.", "transformer.encoder.query_scale."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.decoder\.(query_scale|ref_point_head|ref_anchor_head|bbox_embed)\.", r"transformer.decoder.\1."),
    (r"\.(mlp\.)?activation_fn\.", ".activation."),  # PReLU's weight
    (r"\.(self|cross)_attn\.(?:self|cross)_attn_(query|key)_(content|pos)_proj\.",
     lambda m: f".{m[1][0]}a_{m[2][0]}{m[3]}_proj."),
    (r"\.(self|cross)_attn\.(?:self|cross)_attn_value_proj\.", lambda m: f".{m[1][0]}a_v_proj."),
    (r"\.cross_attn\.cross_attn_query_pos_sine_proj\.", ".ca_qpos_sine_proj."),
    (r"\.(self|cross)_attn\.(?:self|cross)_attn\.output_proj\.", r".\1_attn.out_proj."),
    (r"^(transformer\.decoder\.layers\.\d+)\.self_attn\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"^(transformer\.decoder\.layers\.\d+)\.cross_attn\.cross_attn_layer_norm\.", r"\1.norm2."),
    (r"^(transformer\.decoder\.layers\.\d+)\.mlp\.final_layer_norm\.", r"\1.norm3."),
]

#: config.json ``model_type`` -> rename table
RULES = {"detr": _dense_decoder("multihead_attn"), "conditional_detr": _dense_decoder("cross_attn"),
         "deformable_detr": _DEFORMABLE, "dab-detr": _DAB}
#: config.json ``model_type`` -> the library's model (recipe) name
RECIPES = {"detr": "detr", "conditional_detr": "conditional_detr", "deformable_detr": "deformable_detr",
           "dab-detr": "dab_detr"}
