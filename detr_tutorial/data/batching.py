"""Batching images of different sizes: pad to the largest, keep a padding mask.

DETR pads every image of a batch at the bottom and right to the batch's
largest height and width, and carries a boolean mask (True = padding) through
the backbone, the positional encoding and the attention key-padding masks, so
the padded pixels never influence the result. The official code bundles the
two in a ``NestedTensor``; the book passes them as a plain pair.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["pad_images", "collate_fn"]


def pad_images(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """List of (C, H_i, W_i) images -> ``(batch (B, C, H, W), mask (B, H, W) bool)``.

    ``H``/``W`` are the largest heights/widths; ``mask`` is True on padding.
    All images must share one dtype and one device: mixing, say, uint8 images
    (0..255) with float images (0..1) is an error rather than a promotion,
    because no promotion puts both on the same scale.
    """
    if len(images) == 0:
        raise ValueError("images must hold at least one (C, H, W) tensor")
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or im.dim() != 3:
            raise ValueError(f"images[{i}] must be a (C, H, W) tensor, got "
                             f"{tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__}")
    channels = {im.shape[0] for im in images}
    if len(channels) != 1:
        raise ValueError(f"all images must have the same number of channels, got {sorted(channels)}")
    dtypes = {im.dtype for im in images}
    if len(dtypes) != 1:
        raise ValueError(f"all images must have the same dtype, got {sorted(map(str, dtypes))}; convert them first, "
                         "e.g. with torchvision.transforms.v2.ToDtype(torch.float32, scale=True)")
    devices = {im.device for im in images}
    if len(devices) != 1:
        raise ValueError(f"all images must be on the same device, got {sorted(map(str, devices))}")
    c = images[0].shape[0]
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    batch = images[0].new_zeros((len(images), c, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return batch, mask


def collate_fn(batch: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
    """DataLoader ``collate_fn``: [(image, target), ...] -> ``(images, mask, targets)``."""
    images, targets = zip(*batch)
    padded, mask = pad_images(images)
    return padded, mask, list(targets)
