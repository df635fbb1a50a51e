"""COCO AP via pycocotools against an independent, deliberately simple re-computation."""
import numpy as np
import pytest
import torch

from detr_tutorial.data import ShapesDataset, collate_fn, targets_to_coco, to_coco
from detr_tutorial.evaluation import METRIC_NAMES, detections_to_coco, evaluate_detections, evaluate_model
from detr_tutorial.postprocess import PostProcess


def _iou(a, b):
    """IoU of two [x, y, w, h] boxes."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _hand_ap(gt, dets, threshold, max_dets=100):
    """Area 'all', 101-point interpolated AP at one IoU threshold, averaged over categories with GT."""
    aps = []
    for cat in {c["id"] for c in gt["categories"]}:
        gts = [a for a in gt["annotations"] if a["category_id"] == cat]
        if not gts:
            continue
        hits = []  # (score, is_true_positive) over all images
        for img in gt["images"]:
            g = [a["bbox"] for a in gts if a["image_id"] == img["id"]]
            d = sorted((x for x in dets if x["image_id"] == img["id"] and x["category_id"] == cat),
                       key=lambda x: -x["score"])[:max_dets]
            used = [False] * len(g)
            for det in d:
                best, best_iou = -1, threshold
                for j, box in enumerate(g):
                    iou = _iou(det["bbox"], box)
                    if not used[j] and iou >= best_iou:
                        best, best_iou = j, iou
                if best >= 0:
                    used[best] = True
                hits.append((det["score"], best >= 0))
        hits.sort(key=lambda h: -h[0])
        tp = np.cumsum([h[1] for h in hits])
        fp = np.cumsum([not h[1] for h in hits])
        recall, precision = tp / len(gts), tp / np.maximum(tp + fp, 1)
        for i in range(len(precision) - 2, -1, -1):  # monotone envelope
            precision[i] = max(precision[i], precision[i + 1])
        points = []
        for r in np.linspace(0, 1, 101):
            idx = np.searchsorted(recall, r, side="left")
            points.append(precision[idx] if idx < len(precision) else 0.0)
        aps.append(np.mean(points))
    return float(np.mean(aps))


def _gt(num_images=6, seed=0):
    ds = ShapesDataset(num_images, image_size=64, seed=seed, max_objects=4)
    return to_coco(ds)


def _perfect(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]


def test_perfect_detections_score_one():
    gt = _gt()
    metrics = evaluate_detections(gt, _perfect(gt))
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0)


def test_random_detections_match_hand_computation():
    gt = _gt(num_images=8, seed=3)
    rng = np.random.default_rng(0)
    dets = []
    for a in gt["annotations"]:  # jittered copies of the truth, sometimes with the wrong class
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.15, size=4) * [w, h, w, h]
        dets.append({"image_id": a["image_id"], "category_id": int(rng.integers(3)) if rng.random() < 0.2
                     else a["category_id"], "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                     "score": float(rng.random())})
    for img in gt["images"]:  # plus pure false positives
        for _ in range(3):
            x, y = rng.uniform(0, 40, size=2)
            dets.append({"image_id": img["id"], "category_id": int(rng.integers(3)),
                         "bbox": [float(x), float(y), 20.0, 15.0], "score": float(rng.random())})
    metrics = evaluate_detections(gt, dets)
    hand = [_hand_ap(gt, dets, t) for t in np.linspace(0.5, 0.95, 10)]
    assert 0.05 < metrics["AP"] < 0.95  # a non-trivial case
    assert metrics["AP50"] == pytest.approx(hand[0], abs=1e-9)
    assert metrics["AP75"] == pytest.approx(hand[5], abs=1e-9)
    assert metrics["AP"] == pytest.approx(np.mean(hand), abs=1e-9)


def test_category_zero_counts():
    gt = _gt()
    only_zero = [d for d in _perfect(gt) if d["category_id"] == 0]
    assert any(a["category_id"] == 0 for a in gt["annotations"])
    n_cats = len({a["category_id"] for a in gt["annotations"]})
    assert evaluate_detections(gt, only_zero)["AP50"] == pytest.approx(1.0 / n_cats)


def test_empty_detections_give_zero():
    metrics = evaluate_detections(_gt(), [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["AR100"] == 0.0


def test_unknown_image_id_raises():
    gt = _gt()
    with pytest.raises(ValueError, match="image_id"):
        evaluate_detections(gt, [{"image_id": 999, "category_id": 0, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(TypeError, match="gt"):
        evaluate_detections({"images": []}, [])


def test_detections_to_coco_converts_xyxy_to_xywh():
    res = [{"scores": torch.tensor([0.5]), "labels": torch.tensor([2]), "boxes": torch.tensor([[1.0, 2.0, 5.0, 10.0]])}]
    assert detections_to_coco(res, [7]) == [{"image_id": 7, "category_id": 2, "bbox": [1.0, 2.0, 4.0, 8.0],
                                             "score": 0.5}]


class _Oracle(torch.nn.Module):
    """Returns the ground truth of one fixed batch as near-certain DETR outputs."""

    def __init__(self, targets, num_queries=5, num_classes=3):
        super().__init__()
        logits = torch.full((len(targets), num_queries, num_classes + 1), -10.0)
        logits[..., -1] = 10.0
        boxes = torch.full((len(targets), num_queries, 4), 0.5)
        for i, t in enumerate(targets):
            n = len(t["labels"])
            logits[i, torch.arange(n), -1] = -10.0
            logits[i, torch.arange(n), t["labels"]] = 10.0
            boxes[i, :n] = t["boxes"]
        self.out = {"pred_logits": logits, "pred_boxes": boxes}

    def forward(self, images, mask):
        return self.out


def test_evaluate_model_with_an_oracle():
    ds = ShapesDataset(4, seed=5)
    images, mask, targets = collate_fn([ds[i] for i in range(4)])
    loader = [(images, mask, targets)]
    metrics = evaluate_model(_Oracle(targets), loader, PostProcess(num_classes=3), classes=ds.classes)
    assert metrics["AP"] == pytest.approx(1.0)
    assert evaluate_detections(targets_to_coco(targets, ds.classes), [])["AP"] == 0.0
    with pytest.raises(ValueError, match="classes"):
        evaluate_model(_Oracle(targets), loader, PostProcess(num_classes=3))


def test_duplicate_image_ids_are_rejected():
    """Two shapes splits both number their images from 0; pycocotools would merge the images and
    score each split's detections against the other's objects."""
    a, b = ShapesDataset(3, seed=0), ShapesDataset(3, seed=1)
    targets = [a[i][1] for i in range(3)] + [b[i][1] for i in range(3)]
    with pytest.raises(ValueError, match="the targets' image_id has the id 0 twice"):
        targets_to_coco(targets, a.classes)
    gt = _gt()
    gt["images"].append(dict(gt["images"][2]))
    with pytest.raises(ValueError, match=r"gt\['images'\] has the id 2 twice"):
        evaluate_detections(gt, _perfect(_gt()))
    gt = _gt()
    gt["annotations"][1]["id"] = gt["annotations"][0]["id"]
    with pytest.raises(ValueError, match=r"gt\['annotations'\] has the id 1 twice"):
        evaluate_detections(gt, [])
    res = {"scores": torch.tensor([0.5]), "labels": torch.tensor([0]), "boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]])}
    with pytest.raises(ValueError, match="image_ids has the id 4 twice"):
        detections_to_coco([res, res], [4, 4])


def test_duplicate_image_ids_across_batches_are_rejected_by_evaluate_model():
    a, b = ShapesDataset(2, seed=0), ShapesDataset(2, seed=1)
    batches = [collate_fn([ds[i] for i in range(2)]) for ds in (a, b)]
    loader = [(images, mask, targets) for images, mask, targets in batches]
    model = _Oracle([t for _, _, ts in batches for t in ts][:2])
    with pytest.raises(ValueError, match="id 0 twice"):
        evaluate_model(model, loader, PostProcess(num_classes=3), classes=a.classes)


@pytest.mark.parametrize("field, value", [("score", float("nan")), ("score", float("inf")),
                                          ("bbox", [0.0, float("nan"), 2.0, 2.0]), ("bbox", [0.0, 0.0, -1.0, 2.0]),
                                          ("bbox", [0.0, 0.0, 2.0])])
def test_non_finite_or_malformed_detections_are_rejected(field, value):
    """A NaN score is ranked last by pycocotools: re-scoring false positives as NaN raised AP."""
    gt = _gt()
    dets = _perfect(gt)
    dets[3][field] = value
    with pytest.raises(ValueError, match=r"detections\[3\]"):
        evaluate_detections(gt, dets)


def test_detections_to_coco_rejects_mismatched_lengths_and_non_finite_values():
    res = {"scores": torch.tensor([0.5, 0.4]), "labels": torch.tensor([0, 1]),
           "boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]])}
    with pytest.raises(ValueError, match=r"different lengths \{'scores': 2, 'labels': 2, 'boxes': 1\}"):
        detections_to_coco([res], [0])
    for key in ("scores", "boxes"):
        bad = {"scores": torch.tensor([0.5]), "labels": torch.tensor([0]), "boxes": torch.tensor([[0.0, 0, 2, 2]])}
        bad[key] = bad[key] * float("nan")
        with pytest.raises(ValueError, match="non-finite scores or boxes"):
            detections_to_coco([bad], [0])


def test_postprocess_must_have_as_many_classes_as_the_dataset():
    ds = ShapesDataset(2, seed=5)
    images, mask, targets = collate_fn([ds[i] for i in range(2)])
    with pytest.raises(ValueError, match="num_classes=4 but there are 3 classes"):
        evaluate_model(_Oracle(targets), [(images, mask, targets)], PostProcess(num_classes=4), classes=ds.classes)
