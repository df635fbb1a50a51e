"""The multi-camera world as a Runner dataset, its collate function, and the nuScenes-style metric.

* ``MultiViewWorld`` (``DATASETS``): :class:`~detr_tutorial.data.multiview.MultiViewDataset` rendered once into
  memory, as :func:`detr_tutorial.detr3d_training.multiview_loaders` does. It stands where DETR3D's config has
  ``CustomNuScenesDataset`` (``datasets/nuscenes_dataset.py``) and its pipeline
  (``LoadMultiViewImageFromFiles``, ``NormalizeMultiviewImage``, ``PadMultiViewImage``, ...,
  ``Collect3D``): the world renders float images ``(N, 3, H, W)`` with one ``lidar2img`` per camera, so there
  is no file to load, nothing to normalise or pad, and no augmentation.
* ``multiview_collate`` (``FUNCTIONS``): :func:`detr_tutorial.data.multiview.multiview_collate`, batches
  ``(images (B, N, 3, H, W), lidar2img (B, N, 4, 4), targets)``.
* ``NuScenesMetric`` (``METRICS``): :func:`detr_tutorial.detr3d_training.detr3d_scores` (centre-distance AP at
  0.5, 1, 2, 4 m, mATE, mASE, mAOE) of the ``predict`` outputs, the scores the engine's ``evaluate_detr3d``
  gives (MMDetection3D 1.x has a ``NuScenesMetric`` of that name; 0.x scored in ``NuScenesDataset.evaluate``).
"""
from __future__ import annotations

from typing import Sequence

from torch.utils.data import Dataset

from ...data.multiview import CameraRig, MultiViewDataset, multiview_collate
from ...detr3d_training import detr3d_scores
from ..registry import DATASETS, FUNCTIONS, METRICS
from ..runtime import CocoAPMetric

__all__ = ["MultiViewWorld", "NuScenesMetric"]

FUNCTIONS.register_module(name="multiview_collate", module=multiview_collate)


@DATASETS.register_module(name="MultiViewWorld")
class MultiViewWorld(Dataset):
    """``MultiViewDataset(num_scenes, CameraRig(num_cams, image_hw), min_objects, max_objects, distance, seed)``
    drawn once into a list; items are ``(images (N, 3, H, W), lidar2img (N, 4, 4), target)``."""

    def __init__(self, num_scenes: int, num_cams: int = 6, image_hw: Sequence[int] = (64, 112), min_objects: int = 2,
                 max_objects: int = 8, distance: Sequence[float] = (3.0, 40.0), seed: int = 0) -> None:
        world = MultiViewDataset(num_scenes, CameraRig(num_cams, tuple(image_hw)), min_objects, max_objects,
                                 tuple(distance), seed=seed)
        self.items = [world[i] for i in range(len(world))]
        self.metainfo = {"classes": tuple(world.classes), "pc_range": world.pc_range}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


@METRICS.register_module(name="NuScenesMetric")
class NuScenesMetric(CocoAPMetric):
    """nuScenes-style scores of the decoded boxes against the batch's targets, logged as ``nuscenes/mAP``,
    ``nuscenes/mATE``, ..., ``nuscenes/AP_<class>``. :class:`CocoAPMetric`'s arguments and bookkeeping
    (``classes`` default to the dataset's ``metainfo['classes']``); only the scores differ."""

    default_prefix = "nuscenes"

    def compute_metrics(self, results: list) -> dict[str, float]:
        classes = self.classes or (self.dataset_meta or {}).get("classes")
        if classes is None:
            raise ValueError("NuScenesMetric needs classes: pass classes=... or use a dataset with metainfo['classes']")
        return detr3d_scores([r for _, r in results], [t for t, _ in results], classes)
