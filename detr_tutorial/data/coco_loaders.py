"""Loaders for a COCO-format data set: the settings (:class:`CocoConfig`) and the train/validation loaders.

A :class:`CocoConfig` takes the place of the shapes :class:`~detr_tutorial.data.DataConfig` in a
:class:`~detr_tutorial.presets.Preset` (``dataclasses.replace(preset, data=CocoConfig(...))``); the preset
keeps the model sizes, batch size and optimisation, and the checkpoints record the folders and settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader

from .batching import collate_fn
from .coco_folder import CocoFolder
from .coco_transforms import coco_transforms, scaled_sizes

__all__ = ["CocoConfig", "coco_loaders"]


@dataclass(frozen=True)
class CocoConfig:
    """A COCO-format train and validation split: image folders and their ``instances_*.json``.

    ``image_size``: the shorter side at validation and the largest training scale (800 in the official
    recipe; every size of the augmentation scales with it, see :func:`detr_tutorial.data.coco_transforms`);
    ``max_size``: the cap on the longer side (default: 1333 scaled alike). ``num_classes`` and
    ``contiguous_ids``: see :class:`~detr_tutorial.data.CocoFolder` (default: the largest category id + 1).
    ``normalize``: ImageNet mean and std, for ImageNet-pretrained backbones. ``num_workers``: loader processes.
    """

    train_images: str
    train_json: str
    val_images: str
    val_json: str
    image_size: int = 800
    max_size: Optional[int] = None
    num_classes: Optional[int] = None
    contiguous_ids: bool = False
    normalize: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("train_images", "train_json", "val_images", "val_json"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a path as a str, got {type(getattr(self, name)).__name__}")
        scaled_sizes(self.image_size, self.max_size)  # raises on a bad image_size or max_size
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")


def coco_loaders(data: CocoConfig, batch_size: int) -> tuple[DataLoader, DataLoader, tuple[str, ...]]:
    """Both splits, checked now (json and image headers), read lazily -> ``(train, val, classes)``.

    As :func:`detr_tutorial.data.shapes_loaders`: the train loader shuffles with the global torch RNG
    and drops the last incomplete batch; the validation loader has a private generator. Raises
    ``ValueError`` if the two jsons disagree on the classes or the train split has fewer images than a batch.
    """
    if not isinstance(data, CocoConfig):
        raise TypeError(f"data must be a CocoConfig, got {type(data).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    splits = [CocoFolder(images, json, coco_transforms(train, data.image_size, data.max_size, data.normalize),
                         num_classes=data.num_classes, contiguous_ids=data.contiguous_ids)
              for images, json, train in ((data.train_images, data.train_json, True),
                                          (data.val_images, data.val_json, False))]
    train, val = splits
    if train.classes != val.classes:
        raise ValueError(f"{data.train_json} and {data.val_json} define different classes: {train.classes} and "
                         f"{val.classes}")
    if len(train) < batch_size:
        raise ValueError(f"{data.train_json} has {len(train)} images, fewer than one batch of {batch_size}: the "
                         f"train loader drops incomplete batches; choose a smaller batch size")
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn,
                              num_workers=data.num_workers)
    val_loader = DataLoader(val, batch_size=batch_size, collate_fn=collate_fn, generator=torch.Generator(),
                            num_workers=data.num_workers)
    return train_loader, val_loader, train.classes
