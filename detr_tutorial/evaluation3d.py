"""3-D detection scored the nuScenes way: AP by centre distance on the ground plane, and the
true-positive errors ATE, ASE and AOE.

:func:`nuscenes_map` follows the nuScenes devkit's metric functions
(``nuscenes.eval.detection.algo.accumulate``, ``calc_ap``, ``calc_tp``, version 1.2.0) step for step:

* **Matching**, per class and distance threshold: predictions of every scene are ranked together by
  descending score (ties: the later one first, as the devkit's ``sorted(...)[::-1]``); each takes the
  nearest not yet taken ground-truth box of its class in its scene, by the distance of the box centres
  in the ground plane (x, y); it is a true positive when that distance is *below* the threshold.
* **Precision-recall**: cumulative precision and recall over the ranking, interpolated on 101 recall
  points ``0, 0.01, ..., 1`` with ``np.interp`` (precision 0 beyond the highest recall reached).
* **AP** (``calc_ap``): the precision at recalls above ``min_recall`` (0.1), minus ``min_precision``
  (0.1), clipped at 0, averaged and divided by ``1 - min_precision``. mAP is the mean over thresholds
  and classes.
* **TP errors** (``calc_tp``), from the matches at ``dist_th_tp`` (2 m): the running mean of each error
  over the ranked matches, resampled at the interpolated confidences, averaged over the recall points
  from ``min_recall`` to the highest recall reached; 1 when that recall is below ``min_recall``. ATE is
  the centre distance (metres), ASE ``1 - IoU`` of the two sizes aligned at one centre and heading,
  AOE the absolute yaw difference (radians) with period 2 pi. (The devkit uses period pi for
  ``barrier`` only; none of the book's classes is a barrier.) mATE, mASE and mAOE are means over classes.

As in the devkit, a class with no ground-truth box gets AP 0 and errors 1 and still counts in the
means; the devkit's range filter (``filter_eval_boxes``) is not applied, and velocity and attribute
errors (AVE, AAE) are not computed: the boxes carry neither.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["NUM_RECALL_POINTS", "accumulate", "calc_ap", "calc_tp", "devkit_nuscenes_map", "noisy_predictions",
           "nuscenes_map"]

NUM_RECALL_POINTS = 101  # the devkit's DetectionMetricData.nelem
TP_ERRORS = ("ATE", "ASE", "AOE")


def _array(value: Any, name: str, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    if dtype is np.int64 and not np.issubdtype(value.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
    return value.astype(dtype)


def _scene(item: Any, where: str, num_classes: int, scored: bool) -> dict[str, np.ndarray]:
    """Checked float64 ``boxes (K, 7)``, int64 ``labels (K,)`` and (``scored``) ``scores (K,)`` of one scene."""
    keys = ("boxes", "labels", "scores") if scored else ("boxes", "labels")
    if not isinstance(item, Mapping) or any(k not in item for k in keys):
        raise TypeError(f"{where} must be a dict with keys {keys}, got {item!r:.80}")
    boxes = _array(item["boxes"], f"{where}['boxes']", np.float64)
    labels = _array(item["labels"], f"{where}['labels']", np.int64)
    if boxes.ndim != 2 or boxes.shape[1] != 7:
        raise ValueError(f"{where}['boxes'] must have shape (K, 7) (x, y, z, w, l, h, yaw), got {tuple(boxes.shape)}")
    if labels.shape != (len(boxes),):
        raise ValueError(f"{where}['labels'] must have shape ({len(boxes)},), got {tuple(labels.shape)}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}['boxes'] must be finite, got NaN or inf")
    if (boxes[:, 3:6] <= 0).any():
        raise ValueError(f"{where}['boxes'] sizes (w, l, h) must be > 0")
    if ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"{where}['labels'] must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    out = {"boxes": boxes, "labels": labels}
    if scored:
        scores = _array(item["scores"], f"{where}['scores']", np.float64)
        if scores.shape != (len(boxes),):
            raise ValueError(f"{where}['scores'] must have shape ({len(boxes)},), got {tuple(scores.shape)}")
        if not (np.isfinite(scores).all() and (scores >= 0).all()):
            raise ValueError(f"{where}['scores'] must be finite and >= 0")
        out["scores"] = scores
    return out


def _match_errors(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Columns (ATE, ASE, AOE) ``(n, 3)`` of predictions ``(n, 7)`` matched to ground-truth boxes ``(n, 7)``."""
    ate = np.sqrt((pred[:, 0] - gt[:, 0]) ** 2 + (pred[:, 1] - gt[:, 1]) ** 2)
    inter = np.prod(np.minimum(gt[:, 3:6], pred[:, 3:6]), 1)
    ase = 1 - inter / (np.prod(gt[:, 3:6], 1) + np.prod(pred[:, 3:6], 1) - inter)
    aoe = np.abs((gt[:, 6] - pred[:, 6] + math.pi) % (2 * math.pi) - math.pi)
    return np.stack([ate, ase, aoe], 1)


def accumulate(predictions: Sequence[dict], targets: Sequence[dict], label: int,
               dist_th: float) -> dict[str, np.ndarray]:
    """Match class ``label`` at ``dist_th`` metres and interpolate: the devkit's ``accumulate``.

    ``predictions``/``targets`` are checked scenes (float64 numpy, as :func:`nuscenes_map` prepares).
    Returns 101-point arrays ``recall``, ``precision``, ``confidence`` and ``ATE``, ``ASE``, ``AOE``
    (the devkit's ``DetectionMetricData``: zero precision and confidence, unit errors, when the class
    has no ground truth or no match).
    """
    recall = np.linspace(0, 1, NUM_RECALL_POINTS)
    preds = [p["boxes"][p["labels"] == label] for p in predictions]  # per scene, in the devkit's order
    gts = [t["boxes"][t["labels"] == label] for t in targets]
    npos = sum(len(g) for g in gts)
    scene = np.repeat(np.arange(len(preds)), [len(p) for p in preds])  # of every prediction of the class
    index = np.concatenate([np.arange(len(p)) for p in preds] + [np.zeros(0, dtype=int)])
    scores = np.concatenate([p["scores"][p["labels"] == label] for p in predictions] + [np.zeros(0)])
    order = np.lexsort((-np.arange(len(scores)), -scores))  # descending score, ties: the later one first
    # centre distances on the ground plane, (K_s, M_s) per scene
    dists = [np.sqrt(((p[:, None, :2] - g[None, :, :2]) ** 2).sum(-1)) for p, g in zip(preds, gts)]
    taken = [np.zeros(len(g), dtype=bool) for g in gts]
    matched = np.full(len(scores), -1)  # the ground-truth box each prediction takes, -1: none
    for i in order if npos else []:
        s = scene[i]
        if not taken[s].all():
            dist = np.where(taken[s], np.inf, dists[s][index[i]])
            j = int(np.argmin(dist))  # the first of equal distances, as the devkit's strict "<"
            if dist[j] < dist_th:
                taken[s][j], matched[i] = True, j
    is_tp = matched[order] >= 0
    if not is_tp.any():
        zeros, ones = np.zeros(NUM_RECALL_POINTS), np.ones(NUM_RECALL_POINTS)
        return {"recall": recall, "precision": zeros, "confidence": zeros, **{e: ones for e in TP_ERRORS}}
    tp, fp = np.cumsum(is_tp).astype(float), np.cumsum(~is_tp).astype(float)
    precision = np.interp(recall, tp / npos, tp / (tp + fp), right=0)
    confidence = np.interp(recall, tp / npos, scores[order], right=0)
    hits = order[is_tp]  # the matches in ranked order
    errors = _match_errors(np.stack([gts[scene[i]][matched[i]] for i in hits]),
                           np.stack([preds[scene[i]][index[i]] for i in hits]))
    out = {"recall": recall, "precision": precision, "confidence": confidence}
    for name, err in zip(TP_ERRORS, errors.T):
        running_mean = np.cumsum(err) / np.arange(1, len(err) + 1)
        out[name] = np.interp(confidence[::-1], scores[hits][::-1], running_mean[::-1])[::-1]
    return out


def calc_ap(curve: Mapping[str, np.ndarray], min_recall: float = 0.1, min_precision: float = 0.1) -> float:
    """AP from a 101-point ``curve["precision"]``: the devkit's ``calc_ap``."""
    prec = curve["precision"][round(100 * min_recall) + 1:] - min_precision  # recalls above min_recall
    return float(np.mean(np.clip(prec, 0, None))) / (1.0 - min_precision)


def calc_tp(curve: Mapping[str, np.ndarray], name: str, min_recall: float = 0.1) -> float:
    """Mean error ``curve[name]`` from ``min_recall`` to the highest recall reached: the devkit's ``calc_tp``."""
    first = round(100 * min_recall) + 1
    nonzero = np.flatnonzero(curve["confidence"])
    last = nonzero[-1] if len(nonzero) else 0  # index of the highest recall reached
    return 1.0 if last < first else float(np.mean(curve[name][first:last + 1]))


def nuscenes_map(predictions: Sequence[dict], targets: Sequence[dict], class_names: Sequence[str],
                 dist_ths: Sequence[float] = (0.5, 1.0, 2.0, 4.0), dist_th_tp: float = 2.0,
                 min_recall: float = 0.1, min_precision: float = 0.1) -> dict[str, Any]:
    """nuScenes detection mAP and true-positive errors of 3-D boxes.

    Args:
        predictions: one dict per scene: ``boxes (K, 7)`` (x, y, z, w, l, h, yaw) in metres and
            radians, ``scores (K,)`` finite and >= 0, ``labels (K,)`` ints in ``[0, len(class_names))``;
            tensors or numpy arrays.
        targets: one dict per scene, same order: ``boxes (M, 7)`` and ``labels (M,)``; other keys ignored.
        class_names: the name of each label.
        dist_ths: centre-distance thresholds in metres.
        dist_th_tp: the threshold whose matches give the TP errors; one of ``dist_ths``.
        min_recall, min_precision: the devkit's clipping (0.1 and 0.1 in its detection config).

    Returns:
        ``{"mAP": float, "AP": {class: {threshold: AP}}, "class_AP": {class: mean over thresholds},
        "mATE", "mASE", "mAOE": means over classes, "ATE", "ASE", "AOE": {class: error}}``.
    """
    preds, gts, dist_ths = _check(predictions, targets, class_names, dist_ths, dist_th_tp)
    if not (0 <= min_recall <= 1 and 0 <= min_precision < 1):
        raise ValueError(f"need 0 <= min_recall <= 1 and 0 <= min_precision < 1, got {min_recall!r}, {min_precision!r}")
    curves = {(name, th): accumulate(preds, gts, label, th)
              for label, name in enumerate(class_names) for th in dist_ths}
    return _summary(curves, class_names, dist_ths, dist_th_tp, lambda c: calc_ap(c, min_recall, min_precision),
                    lambda c, e: calc_tp(c, e, min_recall))


def _check(predictions: Sequence[dict], targets: Sequence[dict], class_names: Sequence[str],
           dist_ths: Sequence[float], dist_th_tp: float) -> tuple[list[dict], list[dict], list[float]]:
    """Checked scenes (see :func:`_scene`) and thresholds, or a clear error."""
    if isinstance(class_names, str) or not class_names or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f"class_names must be a non-empty sequence of str, got {class_names!r}")
    dist_ths = [float(t) for t in dist_ths]
    if not dist_ths or min(dist_ths) <= 0 or float(dist_th_tp) not in dist_ths:
        raise ValueError(f"dist_ths must be positive and contain dist_th_tp={dist_th_tp!r}, got {dist_ths!r}")
    if not isinstance(predictions, Sequence) or not isinstance(targets, Sequence):
        raise TypeError("predictions and targets must be lists with one dict per scene")
    if len(predictions) != len(targets):
        raise ValueError("predictions and targets must have one entry per scene, "
                         f"got {len(predictions)} and {len(targets)}")
    preds = [_scene(p, f"predictions[{i}]", len(class_names), True) for i, p in enumerate(predictions)]
    gts = [_scene(t, f"targets[{i}]", len(class_names), False) for i, t in enumerate(targets)]
    return preds, gts, dist_ths


def _summary(curves: Mapping[tuple[str, float], Any], class_names: Sequence[str], dist_ths: Sequence[float],
             dist_th_tp: float, ap: Callable[[Any], float], tp: Callable[[Any, str], float]) -> dict[str, Any]:
    """The result dict of :func:`nuscenes_map` from the curves of every (class, threshold)."""
    result: dict[str, Any] = {"AP": {}, "class_AP": {}, **{e: {} for e in TP_ERRORS}}
    for name in class_names:
        result["AP"][name] = {th: ap(curves[name, th]) for th in dist_ths}
        result["class_AP"][name] = float(np.mean(list(result["AP"][name].values())))
        for e in TP_ERRORS:
            result[e][name] = tp(curves[name, float(dist_th_tp)], e)
    result["mAP"] = float(np.mean(list(result["class_AP"].values())))
    for e in TP_ERRORS:
        result[f"m{e}"] = float(np.mean(list(result[e].values())))
    return result


def devkit_nuscenes_map(predictions: Sequence[dict], targets: Sequence[dict], class_names: Sequence[str],
                        dist_ths: Sequence[float] = (0.5, 1.0, 2.0, 4.0), dist_th_tp: float = 2.0) -> dict[str, Any]:
    """:func:`nuscenes_map`'s numbers computed by the nuScenes devkit: its ``accumulate``, ``calc_ap``
    (min recall and precision 0.1) and ``calc_tp`` on in-memory ``EvalBoxes`` of ``DetectionBox``.
    Needs the ``nuscenes-devkit`` package; ``class_names`` must be nuScenes detection names."""
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.common.utils import center_distance
    from nuscenes.eval.detection import algo
    from nuscenes.eval.detection.data_classes import DetectionBox
    from pyquaternion import Quaternion

    preds, gts, dist_ths = _check(predictions, targets, class_names, dist_ths, dist_th_tp)
    pred_boxes, gt_boxes = EvalBoxes(), EvalBoxes()
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        for scene, eval_boxes in ((pred, pred_boxes), (gt, gt_boxes)):
            scores = scene.get("scores", np.full(len(scene["boxes"]), -1.0))  # -1: the devkit's "no score"
            eval_boxes.add_boxes(str(i), [DetectionBox(
                sample_token=str(i), translation=tuple(box[:3].tolist()), size=tuple(box[3:6].tolist()),
                rotation=tuple(Quaternion(axis=[0, 0, 1], radians=float(box[6])).elements.tolist()),
                detection_name=class_names[label], detection_score=float(score))
                for box, label, score in zip(scene["boxes"], scene["labels"], scores)])
    curves = {(name, th): algo.accumulate(gt_boxes, pred_boxes, name, center_distance, th)
              for name in class_names for th in dist_ths}
    devkit_names = dict(zip(TP_ERRORS, ("trans_err", "scale_err", "orient_err")))
    return _summary(curves, class_names, dist_ths, dist_th_tp, lambda c: algo.calc_ap(c, 0.1, 0.1),
                    lambda c, e: algo.calc_tp(c, 0.1, devkit_names[e]))


def noisy_predictions(targets: Sequence[dict], seed: int = 0, centre_sigma: float = 0.0, size_sigma: float = 0.0,
                      yaw_sigma: float = 0.0, miss_rate: float = 0.0, false_positives: float = 0.0,
                      num_classes: int = 3) -> list[dict[str, np.ndarray]]:
    """Predictions made from ground truth by controlled noise, to see what each metric measures.

    Every kept box moves by a normal offset of ``centre_sigma`` metres in x and y, its sizes are scaled
    by ``exp(N(0, size_sigma))`` each and its yaw turns by ``N(0, yaw_sigma)`` radians; a box is dropped
    with probability ``miss_rate``; each scene gains ``Poisson(false_positives)`` boxes of random class
    (class-typical size, random yaw) 3-40 m away. Scores are uniform in [0, 1), unrelated to the noise.

    Returns one dict per scene: ``boxes (K, 7)``, ``scores (K,)``, ``labels (K,)`` numpy arrays.
    """
    from .data.multiview import CLASS_SIZES

    rng, out = np.random.default_rng(seed), []
    for t in targets:
        boxes = _array(t["boxes"], "boxes", np.float64).reshape(-1, 7)
        labels = _array(t["labels"], "labels", np.int64)
        keep = rng.uniform(size=len(boxes)) >= miss_rate
        boxes, labels = boxes[keep].copy(), labels[keep]
        boxes[:, :2] += rng.normal(0, centre_sigma, size=(len(boxes), 2))
        boxes[:, 3:6] *= np.exp(rng.normal(0, size_sigma, size=(len(boxes), 3)))
        boxes[:, 6] += rng.normal(0, yaw_sigma, size=len(boxes))
        n_fp = rng.poisson(false_positives)
        fp_labels = rng.integers(0, num_classes, size=n_fp)
        dist, azimuth = rng.uniform(3, 40, size=n_fp), rng.uniform(-math.pi, math.pi, size=n_fp)
        sizes = CLASS_SIZES[fp_labels % len(CLASS_SIZES)]
        fp = np.column_stack([dist * np.cos(azimuth), dist * np.sin(azimuth), sizes[:, 2] / 2, sizes,
                              rng.uniform(-math.pi, math.pi, size=n_fp)])
        out.append({"boxes": np.concatenate([boxes, fp]), "labels": np.concatenate([labels, fp_labels]),
                    "scores": rng.uniform(size=len(boxes) + n_fp)})
    return out
