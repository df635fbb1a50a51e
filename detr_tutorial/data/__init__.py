"""Data: the synthetic shapes dataset, its loaders, padded batches, COCO-format export."""
from .batching import collate_fn, pad_images
from .loaders import DataConfig, shapes_loaders
from .coco import save_coco_json, targets_to_coco, to_coco
from .shapes import CLASSES, ShapesDataset

__all__ = ["CLASSES", "DataConfig", "ShapesDataset", "collate_fn", "pad_images", "save_coco_json", "shapes_loaders",
           "targets_to_coco", "to_coco"]
from .multiview import MULTIVIEW_CLASSES, CameraRig, MultiViewDataset, multiview_collate  # noqa: E402
__all__ += ["MULTIVIEW_CLASSES", "CameraRig", "MultiViewDataset", "multiview_collate"]
from .coco_folder import CocoFolder, check_coco_json, coco_classes, export_coco_folder  # noqa: E402
from .coco_loaders import CocoConfig, coco_loaders  # noqa: E402
from .coco_transforms import RandomSizeCrop, coco_transforms  # noqa: E402
__all__ += ["CocoConfig", "CocoFolder", "RandomSizeCrop", "check_coco_json", "coco_classes", "coco_loaders",
            "coco_transforms", "export_coco_folder"]
