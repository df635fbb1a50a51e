"""What a Runner needs besides the model: the shapes data, its collate function, a COCO-AP metric, a hook.

* ``ShapesDataset`` (``DATASETS``): :class:`~detr_tutorial.data.ShapesDataset` rendered once into memory,
  as :func:`detr_tutorial.data.shapes_loaders` does, with ``metainfo = {'classes': ...}``;
* ``detr_collate`` (``FUNCTIONS``): :func:`detr_tutorial.data.collate_fn`;
* ``CocoAPMetric`` (``METRICS``): an ``mmengine.evaluator.BaseMetric`` around
  :func:`detr_tutorial.evaluation.evaluate_detections` (MMDetection's is ``CocoMetric`` in
  ``mmdet/evaluation/metrics/coco_metric.py``; 2.x evaluated in ``CocoDataset.evaluate``);
* ``MetricsLogHook`` (``HOOKS``): appends every validation's metrics to ``work_dir/metrics.jsonl``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from torch.utils.data import Dataset

from ..data import ShapesDataset as _Shapes
from ..data import collate_fn, targets_to_coco
from ..evaluation import detections_to_coco, evaluate_detections
from .registry import DATASETS, FUNCTIONS, HOOKS, METRICS

__all__ = ["CocoAPMetric", "MetricsLogHook", "RenderedShapes"]

FUNCTIONS.register_module(name="detr_collate", module=collate_fn)


@DATASETS.register_module(name="ShapesDataset")
class RenderedShapes(Dataset):
    """``ShapesDataset(num_images, image_size, max_objects, object_size, seed)`` drawn once into a list;
    items are ``(image (3, H, W), target)`` as the library's dataset returns them."""

    def __init__(self, num_images: int, image_size: int = 64, max_objects: int = 4,
                 object_size: Sequence[float] = (0.15, 0.5), seed: int = 0) -> None:
        shapes = _Shapes(num_images, image_size=image_size, max_objects=max_objects, object_size=tuple(object_size),
                         seed=seed)
        self.items = [shapes[i] for i in range(len(shapes))]
        self.metainfo = {"classes": tuple(shapes.classes)}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


@METRICS.register_module(name="CocoAPMetric")
class CocoAPMetric(BaseMetric):
    """COCO box AP of the ``predict`` outputs against the batch's targets, by pycocotools.

    ``classes`` default to the dataset's ``metainfo['classes']`` (the Runner sets ``dataset_meta``).
    :meth:`compute_metrics` returns the twelve numbers of :data:`detr_tutorial.evaluation.METRIC_NAMES`
    (``AP``, ``AP50``, ...), logged as ``coco/AP50`` and so on.
    """

    default_prefix = "coco"

    def __init__(self, classes: Optional[Sequence[str]] = None, collect_device: str = "cpu",
                 prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.classes = None if classes is None else tuple(classes)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        """Keep each image's target and detections (on the CPU) until :meth:`compute_metrics`."""
        targets = data_batch[2]
        if len(targets) != len(data_samples):
            raise ValueError(f"got {len(data_samples)} predictions for a batch of {len(targets)} images")
        for target, result in zip(targets, data_samples):
            cpu = {k: v.cpu() for k, v in result.items() if k != "image_id"}
            self.results.append(({k: v.cpu() for k, v in target.items()}, dict(cpu, image_id=result["image_id"])))

    def compute_metrics(self, results: list) -> dict[str, float]:
        classes = self.classes or (self.dataset_meta or {}).get("classes")
        if classes is None:
            raise ValueError("CocoAPMetric needs classes: pass classes=... or use a dataset with metainfo['classes']")
        targets = [t for t, _ in results]
        detections = detections_to_coco([r for _, r in results], [r["image_id"] for _, r in results])
        return evaluate_detections(targets_to_coco(targets, classes), detections)


@HOOKS.register_module(name="MetricsLogHook")
class MetricsLogHook(Hook):
    """After each validation, append ``{"epoch", "iter", **metrics}`` as one JSON line to
    ``work_dir/<filename>`` (the library's ``metrics.jsonl`` format: one record per evaluation)."""

    priority = "LOW"

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename = filename

    def after_val_epoch(self, runner, metrics: Optional[dict] = None) -> None:
        record = {"epoch": runner.epoch, "iter": runner.iter, **{k: float(v) for k, v in (metrics or {}).items()}}
        with open(Path(runner.work_dir) / self.filename, "a") as f:
            f.write(json.dumps(record) + "\n")
