"""Data: the synthetic shapes dataset, its loaders, padded batches, COCO-format export."""
from .batching import collate_fn, pad_images
from .loaders import DataConfig, shapes_loaders
from .coco import save_coco_json, targets_to_coco, to_coco
from .shapes import CLASSES, ShapesDataset

__all__ = ["CLASSES", "DataConfig", "ShapesDataset", "collate_fn", "pad_images", "save_coco_json", "shapes_loaders",
           "targets_to_coco", "to_coco"]
from .multiview import MULTIVIEW_CLASSES, CameraRig, MultiViewDataset, multiview_collate  # noqa: E402
__all__ += ["MULTIVIEW_CLASSES", "CameraRig", "MultiViewDataset", "multiview_collate"]
