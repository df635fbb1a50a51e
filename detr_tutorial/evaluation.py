"""COCO box AP with pycocotools, the metric every DETR paper reports.

``evaluate_detections`` scores detections against a COCO ground-truth dict
(such as :func:`detr_tutorial.data.to_coco` returns) with pycocotools'
``COCOeval``; ``evaluate_model`` runs a model over a validation loader first.
pycocotools prints its progress and table; both are silenced here, the
returned dict carries the twelve numbers of the standard summary.

Chapter 09 rebuilds the AP computation by hand and checks it against this.

pycocotools trusts its input; two of its silent behaviours would change the
metric, so they are errors here: repeated image (or annotation) ids, which it
merges, and NaN scores, which it ranks last (turning false positives into
harmless ones). Detection boxes must be finite with w, h >= 0.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .data import targets_to_coco
from .data.coco import check_unique_ids

__all__ = ["METRIC_NAMES", "detections_to_coco", "evaluate_detections", "evaluate_model"]

#: The order of ``COCOeval.stats``: AP over IoU .50:.95, at .50, at .75, per
#: object size, then average recall for 1, 10, 100 detections and per size.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco(results: Sequence[dict], image_ids: Sequence[int]) -> list[dict]:
    """Post-processed results (pixel xyxy boxes) -> COCO detection records.

    Args:
        results: one dict per image with ``scores`` (N,), ``labels`` (N,) and
            ``boxes`` (N, 4) pixel (x0, y0, x1, y1), as :mod:`detr_tutorial.postprocess` returns.
        image_ids: the COCO image id of each result.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.

    Raises ``ValueError`` on repeated image ids, on ``scores``, ``labels`` and
    ``boxes`` of different lengths, and on non-finite scores or boxes.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"results and image_ids must have the same length, got {len(results)} and {len(image_ids)}")
    check_unique_ids((int(i) for i in image_ids), "image_ids")
    records = []
    for image_id, res in zip(image_ids, results):
        boxes = res["boxes"].detach().cpu().reshape(-1, 4).double()
        scores = res["scores"].detach().cpu().reshape(-1).double()
        lengths = {"scores": len(scores), "labels": len(res["labels"]), "boxes": len(boxes)}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"the result of image {image_id} has different lengths {lengths}; "
                             "each detection needs one score, one label and one box")
        if not (torch.isfinite(scores).all() and torch.isfinite(boxes).all()):
            raise ValueError(f"the result of image {image_id} has non-finite scores or boxes (NaN or inf)")
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, scores.tolist(), res["labels"].tolist()):
            records.append({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)})
    return records


def _coco(dataset: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate_detections(gt: dict, detections: Sequence[dict]) -> dict[str, float]:
    """COCO box metrics of ``detections`` against the ground truth ``gt``.

    Args:
        gt: COCO ground-truth dict with ``images``, ``annotations`` and ``categories``.
        detections: COCO detection records (see :func:`detections_to_coco`);
            may be empty, which scores 0 wherever there is ground truth.

    Returns:
        ``{name: value}`` for :data:`METRIC_NAMES`; as in pycocotools, a metric
        with no ground truth to score (e.g. APs without small objects) is -1.
    """
    from pycocotools.cocoeval import COCOeval

    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= gt.keys():
        raise TypeError("gt must be a COCO dict with 'images', 'annotations' and 'categories'")
    check_unique_ids((img["id"] for img in gt["images"]), "gt['images']")
    check_unique_ids((ann["id"] for ann in gt["annotations"]), "gt['annotations']")
    check_unique_ids((cat["id"] for cat in gt["categories"]), "gt['categories']")
    known_images = {img["id"] for img in gt["images"]}
    annotations = []
    for i, det in enumerate(detections):
        if det["image_id"] not in known_images:
            raise ValueError(f"detections[{i}] has image_id {det['image_id']!r}, which is not in gt['images']")
        if len(det["bbox"]) != 4:
            raise ValueError(f"detections[{i}]['bbox'] must be [x, y, w, h], got {det['bbox']!r}")
        x, y, w, h = (float(v) for v in det["bbox"])
        score = float(det["score"])
        if not all(map(math.isfinite, (x, y, w, h, score))) or w < 0 or h < 0:
            raise ValueError(f"detections[{i}] must have a finite score and a finite bbox with w, h >= 0, got "
                             f"score {det['score']!r}, bbox {det['bbox']!r}")
        annotations.append({**det, "bbox": [x, y, w, h], "score": score, "area": w * h, "iscrowd": 0, "id": i + 1})
    dt = {"images": copy.deepcopy(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
          "annotations": annotations}
    coco_gt, coco_dt = _coco(copy.deepcopy(gt)), _coco(dt)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(METRIC_NAMES, np.asarray(evaluator.stats))}


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Iterable, postprocess: Callable, classes: Optional[Sequence[str]] = None,
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """Run ``model`` over ``loader`` and score it with :func:`evaluate_detections`.

    Args:
        model: called as ``model(images, mask)``, returns DETR-style outputs.
        loader: iterable of ``(images (B, 3, H, W), mask (B, H, W), targets)``
            batches (a DataLoader with :func:`detr_tutorial.data.collate_fn`).
        postprocess: e.g. :class:`detr_tutorial.postprocess.PostProcess`; called with
            each target's ``size`` (H, W), the frame of the ground-truth boxes.
            Its ``num_classes``, if it has one, must equal ``len(classes)``.
        classes: class names; defaults to ``loader.dataset.classes``.
        device: where the model runs.

    Raises ``ValueError`` if two images share an ``image_id`` (see :func:`evaluate_detections`).
    """
    if classes is None:
        classes = getattr(getattr(loader, "dataset", None), "classes", None)
        if classes is None:
            raise ValueError("classes is required when the loader has no dataset.classes")
    num_classes = getattr(postprocess, "num_classes", None)
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"postprocess has num_classes={num_classes} but there are {len(classes)} classes")
    was_training = model.training
    model.eval()
    all_targets, detections = [], []
    try:
        for images, mask, targets in loader:
            outputs = model(images.to(device), mask.to(device))
            sizes = torch.stack([t["size"] for t in targets]).to(device)
            results = postprocess(outputs, sizes)
            detections += detections_to_coco(results, [int(t["image_id"]) for t in targets])
            all_targets += targets
    finally:
        model.train(was_training)
    if not all_targets:
        raise ValueError("loader yielded no batches")
    return evaluate_detections(targets_to_coco(all_targets, classes), detections)
