"""Ground truth and detections in the COCO json format that pycocotools reads.

COCO boxes are ``[x, y, width, height]`` in pixels of the image as the model
saw it (``target["size"]``). Category ids are the dataset's class indices.

Image ids must be unique: pycocotools indexes images by id, so two images
sharing an id (two concatenated datasets both numbered from 0, say) would be
merged silently and their detections scored against each other's objects.
"""
from __future__ import annotations

import json
import os
import tempfile
from os import PathLike
from typing import Iterable, Sequence, Union

import torch

from ..box_ops import box_cxcywh_to_xyxy

__all__ = ["targets_to_coco", "to_coco", "save_coco_json", "check_unique_ids"]


def check_unique_ids(ids: Iterable, name: str) -> None:
    """Raise ``ValueError`` naming the first id that occurs twice in ``ids``."""
    seen = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{name} has the id {i!r} twice; ids must be unique, or pycocotools merges the "
                             "entries silently (give concatenated datasets distinct image ids)")
        seen.add(i)


def targets_to_coco(targets: Iterable[dict], classes: Sequence[str]) -> dict:
    """DETR-style targets (normalised cx, cy, w, h boxes) -> a COCO ground-truth dict.

    Raises ``ValueError`` if two targets share an ``image_id`` or a box is not finite.
    """
    images, annotations = [], []
    for t in targets:
        image_id = int(t["image_id"])
        h, w = (int(v) for v in t["size"])
        boxes = t["boxes"].reshape(-1, 4).float()
        if not torch.isfinite(boxes).all():
            raise ValueError(f"the target of image {image_id} has non-finite boxes: {boxes.tolist()}")
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:06d}.png"})
        boxes = box_cxcywh_to_xyxy(boxes) * torch.tensor([w, h, w, h])
        for box, label in zip(boxes.tolist(), t["labels"].tolist()):
            x0, y0, x1, y1 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
    check_unique_ids((img["id"] for img in images), "the targets' image_id")
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def to_coco(dataset) -> dict:
    """A dataset of ``(image, target)`` pairs with a ``classes`` attribute -> COCO dict."""
    return targets_to_coco((dataset[i][1] for i in range(len(dataset))), dataset.classes)


def save_coco_json(dataset, path: Union[str, PathLike]) -> None:
    """Write :func:`to_coco` of ``dataset`` to ``path``.

    The json goes to a temporary file in the same folder, which then replaces
    ``path`` in one step: a failure part-way leaves an existing file intact.
    """
    coco = to_coco(dataset)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(coco, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
