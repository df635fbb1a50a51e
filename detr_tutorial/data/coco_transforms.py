"""DETR's COCO augmentation in torchvision transforms v2, scaled to the image size a machine can afford.

The official ``make_coco_transforms`` (facebookresearch/detr, ``datasets/coco.py``) trains with

* a horizontal flip (p = 0.5), then, with p = 0.5 each, either
* a resize of the shorter side to one of 480, 512, ..., 800 (steps of 32; the longer side at most 1333), or
* a resize of the shorter side to 400, 500 or 600, a random crop of 384..600 pixels per side, and the first
  resize again,

and validates at a shorter side of 800 (longer side at most 1333). :func:`coco_transforms` builds the same
pipeline from v2 transforms (``RandomHorizontalFlip``, ``RandomChoice``, ``RandomShortestSize`` and
:class:`RandomSizeCrop`) with every size multiplied by ``image_size / 800``: ``image_size=800`` is the
official recipe, ``image_size=64`` the same augmentation for 64-pixel images on a CPU. The boxes travel
with the image as ``tv_tensors.BoundingBoxes``; a crop clamps them to the crop and
``SanitizeBoundingBoxes`` drops those left smaller than 1 pixel, with their labels.

Differences from the official code, all small: ``RandomShortestSize`` rounds the capped size down where the
official ``get_size_with_aspect_ratio`` rounds to nearest (at most 1 pixel); the official crop removes only
boxes of zero area, ``SanitizeBoundingBoxes`` those under 1 pixel; the official crop fails on an image
smaller than its minimum crop, :class:`RandomSizeCrop` then keeps the whole side. Randomness comes from
torch's global generator, which the engine's checkpoints save, so a resumed run draws the same crops.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RandomSizeCrop", "coco_transforms", "scaled_sizes"]

#: the official recipe at ``image_size=800``: training scales, max size, the crop branch's resize and crop sides.
OFFICIAL_SCALES = tuple(range(480, 801, 32))
OFFICIAL_MAX_SIZE = 1333
OFFICIAL_CROP_RESIZE = (400, 500, 600)
OFFICIAL_CROP = (384, 600)
#: the normalisation of ImageNet-pretrained backbones (and of the official DETR checkpoints).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RandomSizeCrop(v2.Transform):
    """Crop a random region ``min_size..max_size`` pixels high and wide (each side capped by the image's).

    The official ``RandomSizeCrop`` as a v2 transform: the image, its boxes (clamped to the crop) and
    masks are cropped alike. Sides smaller than ``min_size`` are kept whole.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not (isinstance(min_size, int) and isinstance(max_size, int) and 1 <= min_size <= max_size):
            raise ValueError(f"need ints 1 <= min_size <= max_size, got {min_size!r} and {max_size!r}")
        self.min_size, self.max_size = min_size, max_size

    def _side(self, full: int) -> int:
        low, high = min(self.min_size, full), min(self.max_size, full)
        return int(torch.randint(low, high + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image = next(x for x in flat_inputs if isinstance(x, (tv_tensors.Image, torch.Tensor))
                     and not isinstance(x, (tv_tensors.BoundingBoxes, tv_tensors.Mask)))
        full_h, full_w = F.get_size(image)
        width, height = self._side(full_w), self._side(full_h)  # the official order of the two draws
        top = int(torch.randint(0, full_h - height + 1, ()))
        left = int(torch.randint(0, full_w - width + 1, ()))
        return {"top": top, "left": left, "height": height, "width": width}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def scaled_sizes(image_size: int, max_size: Optional[int] = None) -> dict[str, Any]:
    """The official sizes multiplied by ``image_size / 800`` (``max_size`` replaces the scaled 1333 when given).

    Returns ``{"scales", "max_size", "crop_resize", "crop"}``; at ``image_size=800`` the official values.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the shorter side at validation), got {image_size!r}")
    ratio = image_size / OFFICIAL_SCALES[-1]
    scale = lambda sizes: tuple(sorted({max(1, round(s * ratio)) for s in sizes}))  # noqa: E731
    if max_size is None:
        max_size = round(OFFICIAL_MAX_SIZE * ratio)
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < image_size:
        raise ValueError(f"max_size must be an int >= image_size ({image_size}), got {max_size!r}")
    return {"scales": scale(OFFICIAL_SCALES), "max_size": max_size, "crop_resize": scale(OFFICIAL_CROP_RESIZE),
            "crop": scale(OFFICIAL_CROP)}


def coco_transforms(train: bool, image_size: int = 800, max_size: Optional[int] = None,
                    normalize: bool = False) -> v2.Compose:
    """DETR's training (``train=True``) or validation augmentation at ``image_size`` (see the module docstring).

    Called as ``transforms(image, target)`` with a uint8 ``tv_tensors.Image`` (3, H, W) and
    ``target["boxes"]`` pixel ``tv_tensors.BoundingBoxes``. ``normalize`` adds the conversion to float and
    ImageNet's mean and std, as the official pipeline (and ImageNet-pretrained backbones) expect; without
    it the images stay uint8 and the data set scales them to [0, 1], as the shapes data set's.
    """
    sizes = scaled_sizes(image_size, max_size)
    resize = v2.RandomShortestSize(list(sizes["scales"]), max_size=sizes["max_size"])
    if train:
        steps = [v2.RandomHorizontalFlip(p=0.5),
                 v2.RandomChoice([resize, v2.Compose([v2.RandomShortestSize(list(sizes["crop_resize"])),
                                                      RandomSizeCrop(*sizes["crop"]), resize])]),
                 v2.SanitizeBoundingBoxes()]
    else:
        steps = [v2.RandomShortestSize([image_size], max_size=sizes["max_size"])]
    if normalize:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)
