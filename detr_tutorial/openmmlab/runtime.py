"""What a Runner needs besides the model: the shapes data, its collate function, a COCO-AP metric, a hook.

* ``ShapesDataset`` (``DATASETS``): :class:`~detr_tutorial.data.ShapesDataset` rendered once into memory,
  as :func:`detr_tutorial.data.shapes_loaders` does, with ``metainfo = {'classes': ...}``;
* ``detr_collate`` (``FUNCTIONS``): :func:`detr_tutorial.data.collate_fn`;
* ``CocoAPMetric`` (``METRICS``): an ``mmengine.evaluator.BaseMetric`` around
  :func:`detr_tutorial.evaluation.evaluate_detections` (MMDetection's is ``CocoMetric`` in
  ``mmdet/evaluation/metrics/coco_metric.py``; 2.x evaluated in ``CocoDataset.evaluate``);
* ``MetricsLogHook`` (``HOOKS``): appends every validation's metrics to ``work_dir/metrics.jsonl``;
* ``RandomSampler`` (``DATA_SAMPLERS``) and ``TrainRNGHook`` (``HOOKS``): the engine's data order. The engine
  shuffles with ``DataLoader(shuffle=True)``, whose permutation each epoch is seeded by a draw from torch's
  global generator; its checkpoints carry that generator, and its validation loader never draws from it.
  mmengine's ``DefaultSampler`` instead seeds a private generator with ``seed + epoch``. The sampler does
  what the engine's loader does, and the hook keeps the validation loop's draw out of the training stream
  and stores the generators' states in the Runner's checkpoints, so that ``--resume`` continues the stream.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from torch.utils.data import Dataset
from torch.utils.data import RandomSampler as _TorchRandomSampler

from ..data import ShapesDataset as _Shapes
from ..data import collate_fn, targets_to_coco
from ..evaluation import detections_to_coco, evaluate_detections
from ..run_dir import get_rng_state, set_rng_state
from .registry import DATA_SAMPLERS, DATASETS, FUNCTIONS, HOOKS, METRICS

__all__ = ["CocoAPMetric", "GlobalRandomSampler", "MetricsLogHook", "RenderedShapes", "TrainRNGHook"]

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


@DATA_SAMPLERS.register_module(name="RandomSampler")
class GlobalRandomSampler(_TorchRandomSampler):
    """torch's ``RandomSampler`` as ``DataLoader(shuffle=True)`` builds it: each epoch a permutation of the
    dataset from a generator seeded by a draw from torch's global generator.

    Args:
        dataset: the dataset to shuffle.
        seed: the Runner's ``randomness.seed``, which the Runner passes to every sampler and has already
            given to the global generator before building the model; checked, not used again.
        skip_draws: draws from the global generator thrown away each epoch before the seed is drawn. The
            engine's epoch loop wraps the loader in ``tqdm.auto.tqdm``, whose constructor opens an iterator
            of the loader (one draw, for its base seed) before the loop opens its own; ``skip_draws=1``
            puts the Runner's permutation seed at the same place in the stream.
    """

    def __init__(self, dataset: Dataset, seed: Optional[int] = None, skip_draws: int = 0) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if isinstance(skip_draws, bool) or not isinstance(skip_draws, int) or skip_draws < 0:
            raise ValueError(f"skip_draws must be an int >= 0, got {skip_draws!r}")
        super().__init__(dataset)
        self.skip_draws = skip_draws

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.skip_draws):
            torch.empty((), dtype=torch.int64).random_()
        yield from super().__iter__()


@HOOKS.register_module(name="TrainRNGHook")
class TrainRNGHook(Hook):
    """Keep torch's global generator the training's own, as the engine does.

    Validation runs in a fork of the torch generator (the engine's validation loader has a private
    generator, so its draw must not shift the next training epoch's shuffle); every checkpoint stores the
    torch, NumPy and Python generator states under ``"rng"``, and a resumed run restores them before its
    first epoch (not a run that only loads weights with ``load_from``: its iteration count starts at 0).
    """

    priority = "VERY_HIGH"

    def __init__(self) -> None:
        self._val_state: Optional[torch.Tensor] = None
        self._loaded: Optional[tuple[int, dict]] = None

    def before_val(self, runner) -> None:
        self._val_state = torch.get_rng_state()

    def after_val(self, runner) -> None:
        if self._val_state is not None:
            torch.set_rng_state(self._val_state)
            self._val_state = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["rng"] = get_rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if "rng" in checkpoint:
            self._loaded = (checkpoint.get("meta", {}).get("iter"), checkpoint["rng"])

    def before_train(self, runner) -> None:
        if self._loaded is not None and self._loaded[0] == runner.iter:
            set_rng_state(self._loaded[1])
        self._loaded = None
