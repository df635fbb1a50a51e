"""Loaders for the synthetic shapes data: the settings (:class:`DataConfig`) and the train/validation loaders."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from .batching import collate_fn
from .shapes import ShapesDataset

__all__ = ["DataConfig", "shapes_loaders"]


@dataclass(frozen=True)
class DataConfig:
    """Synthetic shapes: ``num_train`` images with seed ``train_seed``, a held-out
    validation split of ``num_val`` images with its own ``val_seed``; ``object_size`` is the
    (min, max) side of a shape as a fraction of ``image_size``."""

    num_train: int = 4000
    num_val: int = 500
    image_size: int = 64
    max_objects: int = 4
    train_seed: int = 0
    val_seed: int = 1
    object_size: tuple[float, float] = (0.15, 0.5)


def shapes_loaders(data: DataConfig, batch_size: int) -> tuple[DataLoader, DataLoader, tuple[str, ...]]:
    """Render the train and validation images once, in memory -> ``(train, val, classes)``.

    The train loader shuffles with the global torch RNG (seed it first; the
    engine's checkpoints save it) and drops the last incomplete batch. The
    validation loader has a private generator: a DataLoader draws a seed each
    time it is iterated, and evaluating must not shift the training shuffle.
    """
    if not isinstance(data, DataConfig):
        raise TypeError(f"data must be a DataConfig, got {type(data).__name__}")
    splits = [ShapesDataset(n, image_size=data.image_size, max_objects=data.max_objects,
                            object_size=data.object_size, seed=seed)
              for n, seed in ((data.num_train, data.train_seed), (data.num_val, data.val_seed))]
    train, val = ([ds[i] for i in range(len(ds))] for ds in splits)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn)
    val_loader = DataLoader(val, batch_size=100, collate_fn=collate_fn, generator=torch.Generator())
    return train_loader, val_loader, splits[0].classes
