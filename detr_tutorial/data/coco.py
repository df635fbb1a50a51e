"""Ground truth and detections in the COCO json format that pycocotools reads.

COCO boxes are ``[x, y, width, height]`` in pixels of the image as the model
saw it (``target["size"]``). Category ids are the dataset's class indices.
"""
from __future__ import annotations

import json
from os import PathLike
from typing import Iterable, Sequence, Union

import torch

from ..box_ops import box_cxcywh_to_xyxy

__all__ = ["targets_to_coco", "to_coco", "save_coco_json"]


def targets_to_coco(targets: Iterable[dict], classes: Sequence[str]) -> dict:
    """DETR-style targets (normalised cx, cy, w, h boxes) -> a COCO ground-truth dict."""
    images, annotations = [], []
    for t in targets:
        image_id = int(t["image_id"])
        h, w = (int(v) for v in t["size"])
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id:06d}.png"})
        boxes = box_cxcywh_to_xyxy(t["boxes"].reshape(-1, 4).float()) * torch.tensor([w, h, w, h])
        for box, label in zip(boxes.tolist(), t["labels"].tolist()):
            x0, y0, x1, y1 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def to_coco(dataset) -> dict:
    """A dataset of ``(image, target)`` pairs with a ``classes`` attribute -> COCO dict."""
    return targets_to_coco((dataset[i][1] for i in range(len(dataset))), dataset.classes)


def save_coco_json(dataset, path: Union[str, PathLike]) -> None:
    """Write :func:`to_coco` of ``dataset`` to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_coco(dataset), f)
