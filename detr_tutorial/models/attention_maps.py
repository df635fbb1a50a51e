"""The decoder's cross-attention weights, read out of a DETR-family model while it runs.

The attention modules return their output only (DETR's averages its weights over the heads), so
``decoder_cross_attention`` records the inputs of every decoder layer's cross-attention with
forward hooks and recomputes the per-head weights from them. It works for DETR
(``TransformerDecoderLayer.multihead_attn``) and for Conditional DETR and DAB-DETR
(``ConditionalDecoderLayer.cross_attn``), whose queries and keys arrive projected and hold a
content and a spatial part per head; ``spatial_only=True`` keeps the spatial part alone.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .attention import MultiheadAttention, scaled_dot_product_attention
from .conditional_layers import ProjectionFreeAttention

__all__ = ["decoder_cross_attention"]


def _per_head_weights(module: nn.Module, query: Tensor, key: Tensor, key_padding_mask: Optional[Tensor],
                      spatial_only: bool) -> Tensor:
    """Softmax weights (B, heads, Q, HW) of one cross-attention call."""
    if isinstance(module, MultiheadAttention):
        if spatial_only:
            raise ValueError("spatial_only=True needs a conditional model: DETR adds content and position")
        # forward(), not __call__: a call would run this pre-hook again
        return module.forward(query, key, key, key_padding_mask=key_padding_mask, average_attn_weights=False)[1]
    q, k = (x.unflatten(-1, (module.num_heads, -1)).transpose(1, 2) for x in (query, key))  # (B, h, L, 2 d_h)
    if spatial_only:  # each head holds its content channels, then its spatial channels
        half = q.shape[-1] // 2
        q, k = q[..., half:] / 2 ** 0.5, k[..., half:]  # keep the full model's 1/sqrt(2 d_h) scale
    return scaled_dot_product_attention(q, k, k, key_padding_mask)[1]


def decoder_cross_attention(model: nn.Module, images: Tensor, mask: Optional[Tensor] = None,
                            spatial_only: bool = False) -> tuple[Tensor, dict]:
    """Run ``model`` (in eval mode, without gradients) and return its decoder's cross-attention.

    Args:
        model: a DETR, ConditionalDETR or DABDETR (one feature map: ``model.input_proj`` a Conv2d).
        images: (B, 3, H, W); mask: (B, H, W) bool, True on padding.
        spatial_only: conditional models only -- the weights of the spatial scores
            ``q_s . k_s / sqrt(2 d_h)`` alone (the paper's "spatial attention maps").

    Returns:
        ``weights`` (layers, B, heads, Q, h, w) over the feature map the decoder reads (each
        map sums to one over the valid pixels), and the model's outputs.
    """
    layers = getattr(getattr(getattr(model, "transformer", None), "decoder", None), "layers", [])
    attention = [getattr(layer, "multihead_attn", None) or getattr(layer, "cross_attn", None) for layer in layers]
    if not attention or not all(isinstance(a, (MultiheadAttention, ProjectionFreeAttention)) for a in attention):
        raise TypeError("model must be a DETR, ConditionalDETR or DABDETR (decoder layers with multihead_attn "
                        f"or cross_attn), got {type(model).__name__}")
    calls, grid = [], []

    def record(module, args, kwargs):
        mask_ = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
        calls.append(_per_head_weights(module, args[0], args[1], mask_, spatial_only))

    hooks = [a.register_forward_pre_hook(record, with_kwargs=True) for a in attention]
    hooks.append(model.input_proj.register_forward_hook(lambda m, i, out: grid.append(out.shape[-2:])))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            outputs = model(images, mask)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return torch.stack(calls).unflatten(-1, tuple(grid[-1])), outputs
