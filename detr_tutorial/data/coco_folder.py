"""Your own data: a COCO-format data set (an image folder and an ``instances_*.json``) for DETR training.

The images and annotations are read by torchvision's ``CocoDetection`` wrapped for transforms v2
(``wrap_dataset_for_transforms_v2``: boxes as pixel ``tv_tensors.BoundingBoxes``), and each sample leaves as
the shapes data set's do: a float image (3, H, W) and a target with normalised (cx, cy, w, h) ``boxes``,
int64 ``labels``, the json's ``image_id``, ``orig_size`` and ``size``.

**Class ids and ``num_classes``.** DETR's classifier has ``num_classes + 1`` outputs; the last, at index
``num_classes``, is "no object". Two conventions turn the json's ``category_id`` into a label:

* official (the default, ``contiguous_ids=False``): the label *is* the category id, and ``num_classes`` is
  the largest id + 1 (the official ``models/detr.py`` builds COCO's with 91: its ids run 1..90 with gaps).
  Unused ids (COCO's 0, 12, 26, ...) are classes that never occur as targets, named ``"N/A"``: the model
  learns never to predict them, for a few extra logits. Labels, predictions and the json agree without a
  table, and a checkpoint trained on COCO keeps its class head.
* contiguous (``contiguous_ids=True``): the ids in increasing order become labels 0..K-1 and
  ``num_classes`` is K, the number of categories; ``category_ids[label]`` maps a prediction back.

The library uses the official one unless asked. The trap it guards: ``num_classes`` set to the number of
categories (80 for COCO) while the ids go up to 90. In the official code a label equal to ``num_classes`` is
then silently trained as "no object", and a larger one indexes past the classifier (a CUDA device-side assert,
an ``IndexError`` on the CPU). Here that, and every other inconsistency of the json, is a ``ValueError`` naming
the file when the data set is built, before training.

**Checks.** Duplicate ids; an annotation whose image or category is not listed; a bbox that is not four
finite numbers, has a negative width or height, or lies more than 1 pixel outside its image (boxes within
1 pixel are clamped to the image, as the official loader clamps every box); an image file that is
missing, cannot be read or has another size than the json says. As in the official loader, crowd
annotations (``iscrowd=1``) are dropped and boxes of zero width or height are skipped.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from os import PathLike
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms.v2 import functional as F

from ..box_ops import box_xyxy_to_cxcywh
from .coco import check_unique_ids, save_coco_json

__all__ = ["CocoFolder", "UNUSED_CLASS", "check_coco_json", "coco_classes", "export_coco_folder"]

#: the name of a class id that no category uses (the official DETR demo's name for COCO's gaps).
UNUSED_CLASS = "N/A"
#: how far (pixels) a box may overshoot its image before it is an error rather than a rounding to clamp.
BOX_TOLERANCE = 1.0
Pathish = Union[str, PathLike]


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"annotations: {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"annotations: {path} is not valid JSON ({error})") from error
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)] \
        if isinstance(data, dict) else ["images", "annotations", "categories"]
    if missing:
        raise ValueError(f"annotations: {path} is not a COCO json: it lacks the lists {missing}")
    return data


def check_coco_json(data: dict, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` (the json's path) and the entry at fault unless ``data`` is a
    consistent COCO detection json (see the module docstring for what is checked)."""
    for key in ("images", "annotations", "categories"):
        check_unique_ids((entry.get("id") for entry in data[key]), f"{source}: {key}")
    for cat in data["categories"]:
        if isinstance(cat.get("id"), bool) or not isinstance(cat.get("id"), int) or cat["id"] < 0:
            raise ValueError(f"{source}: category {cat!r} needs an int id >= 0")
    sizes = {}
    for img in data["images"]:
        w, h = img.get("width"), img.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
                and isinstance(img.get("file_name"), str)):
            raise ValueError(f"{source}: image {img.get('id')!r} needs a file_name and positive int width and "
                             f"height, got {img!r}")
        sizes[img["id"]] = (w, h)
    known = {cat["id"] for cat in data["categories"]}
    for ann in data["annotations"]:
        where = f"{source}: annotation {ann.get('id')!r}"
        if ann.get("image_id") not in sizes:
            raise ValueError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in known:
            raise ValueError(f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories' "
                             f"(ids {sorted(known)})")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
            raise ValueError(f"{where}: bbox must be [x, y, width, height], four finite numbers, got {bbox!r}")
        x, y, bw, bh = bbox
        if bw < 0 or bh < 0:
            raise ValueError(f"{where}: bbox {bbox} has a negative size (width {bw}, height {bh}); COCO boxes are "
                             f"[x, y, width, height], not [x0, y0, x1, y1]")
        w, h = sizes[ann["image_id"]]
        tol = BOX_TOLERANCE
        if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
            raise ValueError(f"{where}: bbox {bbox} lies outside its image {ann['image_id']} ({w} x {h} pixels) by "
                             f"more than {tol:g} pixel")


def coco_classes(categories: list[dict], num_classes: Optional[int] = None,
                 contiguous_ids: bool = False, source: str = "the json") -> tuple[tuple[str, ...], dict[int, int]]:
    """Class names (index = label) and ``{category_id: label}`` for one of the two conventions.

    ``num_classes`` (default: the smallest that fits) must be at least the largest id + 1 (official) or
    the number of categories (contiguous); extra classes are named :data:`UNUSED_CLASS`.
    """
    ids = sorted(cat["id"] for cat in categories)
    if not ids:
        raise ValueError(f"{source} has no categories")
    label_of = {i: n for n, i in enumerate(ids)} if contiguous_ids else {i: i for i in ids}
    needed = max(label_of.values()) + 1
    if num_classes is None:
        num_classes = needed
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < needed:
        rule = (f"{len(ids)} categories" if contiguous_ids else
                f"the largest category id is {ids[-1]}: DETR's num_classes is the largest id + 1, "
                f"not the number of categories ({len(ids)})")
        raise ValueError(f"num_classes={num_classes!r} is too small for {source}: need at least {needed} ({rule}); "
                         f"the no-object class is index num_classes")
    names = [UNUSED_CLASS] * num_classes
    for cat in categories:
        names[label_of[cat["id"]]] = str(cat.get("name", cat["id"]))
    return tuple(names), label_of


class CocoFolder(Dataset):
    """A COCO detection data set: images under ``images``, annotations in the json ``annotations``.

    Args:
        images: the image folder (``file_name`` entries are relative to it).
        annotations: the ``instances_*.json``.
        transforms: optional transforms v2, called as ``transforms(image, target)`` with a uint8
            ``tv_tensors.Image`` and ``target["boxes"]`` pixel ``BoundingBoxes`` (XYXY), e.g.
            :func:`detr_tutorial.data.coco_transforms`.
        num_classes: the classifier's classes without "no object" (default: the smallest that fits).
        contiguous_ids: relabel the category ids 0..K-1 instead of keeping them (see the module docstring).
        check_images: open every image's header now and compare its size with the json's.

    Attributes: ``classes`` (names, index = label), ``num_classes``, ``category_ids`` (label -> the json's
    category id, None for unused labels), ``no_object`` (the no-object index, = ``num_classes``).
    """

    def __init__(self, images: Pathish, annotations: Pathish, transforms: Optional[Callable] = None,
                 num_classes: Optional[int] = None, contiguous_ids: bool = False, check_images: bool = True) -> None:
        self.root, self.annotations = Path(images), Path(annotations)
        if not self.root.is_dir():
            raise ValueError(f"images: {self.root} is not a folder")
        data = _load_json(self.annotations)
        check_coco_json(data, str(self.annotations))
        self.classes, self._label_of = coco_classes(data["categories"], num_classes, contiguous_ids,
                                                    str(self.annotations))
        self.category_ids = tuple(next((i for i, n in self._label_of.items() if n == label), None)
                                  for label in range(len(self.classes)))
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = CocoDetection(str(self.root), str(self.annotations))
        self._coco = coco.coco
        self._dataset = wrap_dataset_for_transforms_v2(coco, target_keys=("boxes", "labels"))
        self.transforms = transforms
        if check_images:
            for img in data["images"]:
                self._check_image(img)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def no_object(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self._dataset)

    def _path(self, image_id: int) -> Path:
        return self.root / self._coco.imgs[image_id]["file_name"]

    def _check_image(self, img: dict) -> None:
        path = self.root / img["file_name"]
        try:
            with Image.open(path) as opened:
                size = opened.size
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"image {img['id']}: {path} cannot be read as an image ({error})") from error
        if size != (img["width"], img["height"]):
            raise ValueError(f"image {img['id']}: {path} is {size[0]} x {size[1]} pixels but {self.annotations} "
                             f"says {img['width']} x {img['height']}; the boxes would not fit it")

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns ``(image (3, H, W) float32, target)`` as :class:`detr_tutorial.data.ShapesDataset` does."""
        image_id = self._dataset.ids[index]
        try:
            pil, raw = self._dataset[index]
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"image {image_id}: {self._path(image_id)} cannot be read ({error})") from error
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        h0, w0 = image.shape[-2:]
        target = self._target(raw, image_id, (h0, w0))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        pixels = image.as_subclass(Tensor)
        h, w = pixels.shape[-2:]
        boxes = target["boxes"].as_subclass(Tensor).float().reshape(-1, 4)
        out = {"boxes": box_xyxy_to_cxcywh(boxes) / torch.tensor([w, h, w, h], dtype=torch.float32),
               "labels": target["labels"].as_subclass(Tensor), "image_id": torch.tensor(image_id),
               "orig_size": torch.tensor([h0, w0]), "size": torch.tensor([h, w])}
        return (pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels.float()), out

    def _target(self, raw: dict, image_id: int, canvas: tuple[int, int]) -> dict:
        """The wrapper's target -> non-crowd boxes clamped to the image, zero-size ones dropped, labels mapped."""
        if "boxes" not in raw:  # an image without annotations
            return {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=canvas),
                    "labels": torch.zeros(0, dtype=torch.int64)}
        boxes = F.clamp_bounding_boxes(raw["boxes"])
        crowd = torch.tensor([ann.get("iscrowd", 0) for ann in self._coco.imgToAnns[image_id]], dtype=torch.bool)
        keep = ~crowd & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([self._label_of[int(c)] for c in raw["labels"]], dtype=torch.int64)
        return {"boxes": tv_tensors.wrap(boxes[keep], like=boxes), "labels": labels[keep]}

    def __repr__(self) -> str:
        return (f"CocoFolder({str(self.root)!r}, {str(self.annotations)!r}, images={len(self)}, "
                f"num_classes={self.num_classes})")


def export_coco_folder(dataset: Dataset, images: Pathish, annotations: Pathish) -> None:
    """Write ``dataset`` (float images in [0, 1], a ``classes`` attribute) as a COCO folder: one PNG per image
    under ``images``, named as :func:`detr_tutorial.data.to_coco` names them, and the json ``annotations``.

    PNG is lossless, so :class:`CocoFolder` reads back the same pixels (for images that were uint8)."""
    folder = Path(images)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        image, target = dataset[index]
        pixels = (image * 255).round().clamp(0, 255).to(torch.uint8)
        F.to_pil_image(pixels).save(folder / f"{int(target['image_id']):06d}.png")
    save_coco_json(dataset, annotations)
