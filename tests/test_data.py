"""The synthetic shapes dataset, transforms v2, padded batches and COCO export."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from detr_tutorial.box_ops import box_cxcywh_to_xyxy
from detr_tutorial.data import CLASSES, ShapesDataset, collate_fn, pad_images, save_coco_json, to_coco


def test_same_seed_same_bytes_and_order_independent():
    a, b = ShapesDataset(20, seed=3), ShapesDataset(20, seed=3)
    late_first = [b.render(i) for i in reversed(range(20))][::-1]
    for i in range(20):
        img_a, boxes_a, labels_a = a.render(i)
        img_b, boxes_b, labels_b = late_first[i]
        assert img_a.tobytes() == img_b.tobytes()
        np.testing.assert_array_equal(boxes_a, boxes_b)
        np.testing.assert_array_equal(labels_a, labels_b)


def test_different_seeds_differ():
    assert ShapesDataset(1, seed=0).render(0)[0].tobytes() != ShapesDataset(1, seed=1).render(0)[0].tobytes()


@pytest.mark.parametrize("kwargs", [{}, {"image_size": 40, "max_image_size": 90, "max_objects": 6}])
def test_targets_are_valid(kwargs):
    ds = ShapesDataset(60, seed=5, **kwargs)
    counts = set()
    for i in range(len(ds)):
        image, t = ds[i]
        h, w = image.shape[-2:]
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert 0 <= image.min() and image.max() <= 1
        assert t["size"].tolist() == [h, w] == t["orig_size"].tolist()
        assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32
        assert ((t["labels"] >= 0) & (t["labels"] < len(CLASSES))).all()
        xyxy = box_cxcywh_to_xyxy(t["boxes"])
        assert (xyxy >= 0).all() and (xyxy <= 1 + 1e-6).all()
        assert (t["boxes"][:, 2:] > 0).all()
        assert t["image_id"].item() == i
        counts.add(len(t["labels"]))
    assert min(counts) >= ds.min_objects and max(counts) <= ds.max_objects and len(counts) > 1


def test_boxes_are_tight_around_drawn_pixels():
    # A shape is one flat colour on a noisy background: its pixels touch all four box edges
    # and none lie outside the box.
    ds = ShapesDataset(30, seed=2, max_objects=1)
    for i in range(len(ds)):
        img, boxes, _ = ds.render(i)
        x0, y0, x1, y1 = boxes[0].astype(int)
        inside = img[y0:y1, x0:x1].reshape(-1, 3)
        colours, counts = np.unique(inside, axis=0, return_counts=True)
        hit = (img == colours[counts.argmax()]).all(-1)
        box = hit[y0:y1, x0:x1]
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
        assert hit.sum() == box.sum()


def test_varying_sizes_need_padding_and_mask_is_correct():
    ds = ShapesDataset(8, image_size=32, max_image_size=64, seed=1)
    images, mask, targets = collate_fn([ds[i] for i in range(8)])
    assert images.shape[0] == 8 and mask.shape == (8, *images.shape[-2:]) and mask.dtype == torch.bool
    for k, t in enumerate(targets):
        h, w = t["size"].tolist()
        assert not mask[k, :h, :w].any()
        assert mask[k, h:, :].all() and mask[k, :, w:].all()
        assert (images[k, :, h:, :] == 0).all() and (images[k, :, :, w:] == 0).all()
        torch.testing.assert_close(images[k, :, :h, :w], ds[k][0])
    assert mask.any(), "sizes were drawn from a range, some padding expected"


def test_pad_images_errors():
    with pytest.raises(ValueError, match="at least one"):
        pad_images([])
    with pytest.raises(ValueError, match=r"images\[1\] must be a \(C, H, W\)"):
        pad_images([torch.zeros(3, 4, 4), torch.zeros(4, 4)])
    with pytest.raises(ValueError, match="same number of channels"):
        pad_images([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)])


def test_dataloader_batches():
    loader = DataLoader(ShapesDataset(10, seed=0), batch_size=4, collate_fn=collate_fn)
    images, mask, targets = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and not mask.any() and len(targets) == 4


def test_horizontal_flip_keeps_boxes_aligned():
    plain = ShapesDataset(10, seed=4)
    flipped = ShapesDataset(10, seed=4, transforms=v2.RandomHorizontalFlip(p=1.0))
    for i in range(10):
        img, t = plain[i]
        img_f, t_f = flipped[i]
        torch.testing.assert_close(img_f, img.flip(-1))
        expected = t["boxes"].clone()
        expected[:, 0] = 1 - expected[:, 0]
        torch.testing.assert_close(t_f["boxes"], expected)


def test_resize_and_crop_keep_boxes_in_image_coordinates():
    tf = v2.Compose([v2.Resize((96, 128)), v2.RandomCrop((80, 100)), v2.SanitizeBoundingBoxes(min_size=1)])
    ds = ShapesDataset(20, seed=7, transforms=tf)
    for i in range(20):
        img, t = ds[i]
        assert img.shape[-2:] == (80, 100) and t["size"].tolist() == [80, 100]
        assert t["orig_size"].tolist() == [64, 64]
        assert len(t["boxes"]) == len(t["labels"])
        xyxy = box_cxcywh_to_xyxy(t["boxes"])
        assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()


def test_coco_export_read_by_pycocotools(tmp_path):
    ds = ShapesDataset(12, seed=9, image_size=48, max_image_size=72)
    path = tmp_path / "gt.json"
    save_coco_json(ds, path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == list(range(12))
    assert sorted(coco.getCatIds()) == [0, 1, 2]
    n_objects = sum(len(ds[i][1]["labels"]) for i in range(12))
    assert len(coco.getAnnIds()) == n_objects
    img = coco.loadImgs(5)[0]
    assert [img["height"], img["width"]] == ds[5][1]["size"].tolist()
    # Perfect detections score AP = 1 in pycocotools: the export is consistent.
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in json.loads(path.read_text())["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)


def test_images_without_objects_export_cleanly():
    ds = ShapesDataset(3, min_objects=0, max_objects=0, seed=0)
    coco = to_coco(ds)
    assert len(coco["images"]) == 3 and coco["annotations"] == []
    assert ds[0][1]["boxes"].shape == (0, 4) and ds[0][1]["labels"].shape == (0,)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_images": -1}, "num_images"),
    ({"image_size": 4}, "image_size"),
    ({"image_size": 64, "max_image_size": 32}, "max_image_size"),
    ({"min_objects": 3, "max_objects": 2}, "min_objects <= max_objects"),
    ({"object_size": (0.5, 0.2)}, "object_size"),
    ({"max_overlap": 1.5}, "max_overlap"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesDataset(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError, match="out of range"):
        ShapesDataset(5)[5]


def test_pad_images_rejects_mixed_dtypes_and_devices():
    """A uint8 first image used to turn the float images into uint8 zeros."""
    with pytest.raises(ValueError, match=r"same dtype, got \['torch.float32', 'torch.uint8'\].*ToDtype"):
        pad_images([torch.zeros(3, 4, 4, dtype=torch.uint8), torch.full((3, 5, 5), 0.5)])
    batch, _ = pad_images([torch.full((3, 4, 4), 0.5, dtype=torch.float64), torch.ones(3, 2, 2, dtype=torch.float64)])
    assert batch.dtype == torch.float64 and batch[0].min() == 0.5


class _Unserialisable:
    """Shapes whose class names end with an object json cannot write: json.dump fails at the
    categories, after the images and annotations are written."""

    def __init__(self, n):
        self.data, self.classes = ShapesDataset(n, seed=0), ("rectangle", "ellipse", object())

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def test_save_coco_json_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "gt.json"
    save_coco_json(ShapesDataset(3, seed=0), path)
    before = path.read_text()
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_coco_json(_Unserialisable(40), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["gt.json"]  # no temporary file left behind
