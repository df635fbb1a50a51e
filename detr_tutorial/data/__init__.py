"""Data: the synthetic shapes dataset, padded batches, COCO-format export."""
from .batching import collate_fn, pad_images
from .coco import save_coco_json, targets_to_coco, to_coco
from .shapes import CLASSES, ShapesDataset

__all__ = ["CLASSES", "ShapesDataset", "collate_fn", "pad_images", "save_coco_json", "targets_to_coco", "to_coco"]
