"""A procedural dataset of coloured shapes on textured backgrounds.

Every image is a pure function of ``(seed, index)``: the same seed gives the
same bytes on any machine, images can be rendered in any order (so DataLoader
workers need no shared state), and nothing is downloaded. Targets follow
DETR's convention:

* ``boxes``  (n, 4) float32, normalised (cx, cy, w, h) in [0, 1]
* ``labels`` (n,)   int64 class indices in [0, num_classes)
* ``image_id`` int64 scalar, ``orig_size`` and ``size`` (2,) int64 as (H, W)
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..box_ops import box_xyxy_to_cxcywh

__all__ = ["CLASSES", "ShapesDataset"]

CLASSES = ("rectangle", "ellipse", "triangle")


class ShapesDataset(Dataset):
    """Images of 1..``max_objects`` shapes (rectangle, ellipse, triangle).

    Args:
        num_images: length of the dataset.
        image_size: side of the square images, or the smallest side when
            ``max_image_size`` is given.
        max_image_size: if set, each image's height and width are drawn
            independently from ``[image_size, max_image_size]``, so a batch
            needs padding.
        min_objects, max_objects: number of shapes per image (inclusive).
        object_size: (min, max) side of a shape as a fraction of the image side.
        max_overlap: a new shape may cover at most this fraction of an existing
            one (and vice versa), so every object stays visible.
        seed: the split's seed; use different seeds for train and validation.
        transforms: optional torchvision transforms v2, called as
            ``transforms(image, target)`` with a uint8 ``tv_tensors.Image`` and
            ``target["boxes"]`` a pixel ``tv_tensors.BoundingBoxes`` (XYXY).
    """

    classes = CLASSES

    def __init__(self, num_images: int = 1000, image_size: int = 64, max_image_size: Optional[int] = None,
                 min_objects: int = 1, max_objects: int = 4, object_size: tuple[float, float] = (0.15, 0.5),
                 max_overlap: float = 0.2, seed: int = 0, transforms: Optional[Callable] = None) -> None:
        if not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"num_images must be a non-negative int, got {num_images!r}")
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if max_image_size is not None and (not isinstance(max_image_size, int) or max_image_size < image_size):
            raise ValueError(f"max_image_size must be an int >= image_size ({image_size}), got {max_image_size!r}")
        if not (isinstance(min_objects, int) and isinstance(max_objects, int) and 0 <= min_objects <= max_objects):
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects!r} and {max_objects!r}")
        lo, hi = object_size
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"object_size must be (min, max) with 0 < min <= max <= 1, got {object_size!r}")
        if not 0 <= max_overlap <= 1:
            raise ValueError(f"max_overlap must be in [0, 1], got {max_overlap!r}")
        self.num_images, self.image_size, self.max_image_size = num_images, image_size, max_image_size
        self.min_objects, self.max_objects = min_objects, max_objects
        self.object_size, self.max_overlap = (float(lo), float(hi)), float(max_overlap)
        self.seed, self.transforms = seed, transforms

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_images

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw image ``index``.

        Returns ``(image (H, W, 3) uint8, boxes (n, 4) float32 pixel xyxy,
        labels (n,) int64)``; a box is the tight extent of the shape's pixels.
        """
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_images} images")
        rng = np.random.default_rng((self.seed, index))
        if self.max_image_size is None:
            h = w = self.image_size
        else:
            h, w = (int(v) for v in rng.integers(self.image_size, self.max_image_size + 1, size=2))
        image, bg_color = _background(rng, h, w)
        boxes, labels = [], []
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            for _attempt in range(30):
                label = int(rng.integers(len(self.classes)))
                bw, bh = (max(3, int(round(s))) for s in rng.uniform(*self.object_size, size=2) * (w, h))
                x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
                box = np.array([x0, y0, x0 + bw, y0 + bh], dtype=np.float32)
                if all(_overlap(box, other) <= self.max_overlap for other in boxes):
                    break
            else:
                continue  # no room left for another shape
            mask = _shape_mask(self.classes[label], bw, bh, rng)
            ys, xs = np.nonzero(mask)
            color = _contrasting_color(rng, bg_color)
            image[y0:y0 + bh, x0:x0 + bw][mask] = color
            boxes.append(np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1],
                                  dtype=np.float32))
            labels.append(label)
        boxes_arr = np.stack(boxes) if boxes else np.zeros((0, 4), dtype=np.float32)
        return image, boxes_arr, np.array(labels, dtype=np.int64)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns ``(image (3, H, W) float32 in [0, 1], target)``."""
        array, boxes, labels = self.render(index)
        h0, w0 = array.shape[:2]
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1).contiguous())
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(h0, w0)),
                  "labels": torch.from_numpy(labels)}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        h, w = image.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        boxes_t = target["boxes"].as_subclass(Tensor).float()
        out = {
            "boxes": box_xyxy_to_cxcywh(boxes_t) / scale,
            "labels": target["labels"].as_subclass(Tensor),
            "image_id": torch.tensor(index, dtype=torch.int64),
            "orig_size": torch.tensor([h0, w0], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }
        image_t = image.as_subclass(Tensor)
        image_t = image_t.float() / 255 if image_t.dtype == torch.uint8 else image_t.float()
        return image_t, out

    def __repr__(self) -> str:
        size = (f"{self.image_size}" if self.max_image_size is None
                else f"{self.image_size}..{self.max_image_size}")
        return (f"ShapesDataset(num_images={self.num_images}, image_size={size}, "
                f"objects={self.min_objects}..{self.max_objects}, seed={self.seed})")


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth colour gradient plus a sinusoidal texture and pixel noise."""
    base = rng.uniform(40, 200, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy = rng.uniform(0.2, 0.8, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    texture = np.sin(fx * xx + phase[0]) * np.sin(fy * yy + phase[1])  # (H, W)
    gradient = (xx / w - 0.5) * rng.uniform(-30, 30) + (yy / h - 0.5) * rng.uniform(-30, 30)
    image = base + (12 * texture + gradient)[..., None] + rng.normal(0, 6, size=(h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), base


def _contrasting_color(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    for _ in range(20):
        color = rng.integers(0, 256, size=3)
        if np.abs(color - background).sum() > 180:
            break
    return color.astype(np.uint8)


def _shape_mask(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) bool mask of a shape that touches all four sides of its box."""
    ys = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    if kind == "rectangle":
        return np.ones((h, w), dtype=bool)
    if kind == "ellipse":
        return ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2 <= 1.0
    if kind == "triangle":  # apex on one horizontal side, base on the other
        apex = rng.uniform(0.0, 1.0) * w
        t = ys / h if rng.random() < 0.5 else 1.0 - ys / h  # 0 at the apex, 1 at the base
        return (xs >= apex * (1 - t)) & (xs <= apex + (w - apex) * t)
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {CLASSES}")


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Largest fraction of either box covered by their intersection."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / min(area_a, area_b)
