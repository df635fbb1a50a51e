"""Training DETR3D: the 3-D Hungarian assigner, the loss, NMS-free decoding and the multi-camera loaders.

What the official ``Detr3DHead`` trains with (``projects/mmdet3d_plugin``, read at the commit named in the
book's references):

* matching per sample (``HungarianAssigner3D``): ``2.0 x`` focal class cost ``+ 0.25 x`` L1 between the
  predicted code and ``normalize_bbox(gt)`` on the first 8 entries (centres in metres, log sizes,
  sin/cos), NaN/inf costs replaced by +-100, then ``linear_sum_assignment``;
* loss per decoder layer, every layer matched on its own and weighted alike: sigmoid focal loss (gamma 2,
  alpha 0.25, weight 2.0) summed over queries x classes and divided by the number of matched queries,
  plus L1 (weight 0.25) between matched codes and targets times the ``code_weights``, divided the same;
* decoding (``NMSFreeCoder``): sigmoid scores, the top ``max_num`` over queries x classes (label =
  index mod K, query = index div K), ``denormalize_bbox``, boxes whose centre lies outside
  ``post_center_range`` dropped. No NMS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torchvision
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data.multiview import CameraRig, MultiViewDataset, multiview_collate
from .evaluation3d import nuscenes_map
from .matcher import focal_class_cost
from .models.detr3d import build_detr3d
from .models.detr3d_geometry import denormalize_bbox, normalize_bbox

__all__ = ["Detr3DCriterion", "HungarianAssigner3D", "MultiViewConfig", "NMSFreeCoder", "build_detr3d_training",
           "detr3d_scores", "evaluate_detr3d", "multiview_loaders", "post_center_range", "predict", "seen_targets"]

Indices = list[tuple[Tensor, Tensor]]


def _check_outputs(outputs: dict, code_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    if not isinstance(outputs, dict) or "pred_logits" not in outputs or "pred_boxes" not in outputs:
        raise TypeError("outputs must be a dict with 'pred_logits' (B, Q, K) and 'pred_boxes' (B, Q, 8 or 10)")
    logits, codes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3 or codes.dim() != 3 or logits.shape[:2] != codes.shape[:2] or codes.shape[-1] not in (8, 10):
        raise ValueError(f"pred_logits must be (B, Q, K) and pred_boxes (B, Q, 8 or 10) with the same (B, Q), got "
                         f"{tuple(logits.shape)} and {tuple(codes.shape)}")
    return logits, codes


def _check_targets(targets: Sequence[dict], batch_size: int, num_classes: int) -> None:
    if not isinstance(targets, (list, tuple)) or len(targets) != batch_size:
        raise ValueError(f"targets must be a list of {batch_size} dicts (one per sample)")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 7:
            raise ValueError(f"targets[{i}]['boxes'] must be an (n, 7) tensor (x, y, z, w, l, h, yaw)")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"targets[{i}]['boxes'] holds NaN or infinite values")
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1] or labels.is_floating_point():
            raise ValueError(f"targets[{i}]['labels'] must be an integer tensor of shape ({boxes.shape[0]},)")
        if ((labels < 0) | (labels >= num_classes)).any():
            raise ValueError(f"targets[{i}]['labels'] must lie in [0, {num_classes - 1}]")


class HungarianAssigner3D:
    """One-to-one matching of queries to ground-truth boxes (official ``HungarianAssigner3D``).

    ``cost = cls_weight * focal_class_cost + reg_weight * L1(code[:, :8], normalize_bbox(gt)[:, :8])``.
    The focal cost is the library's (:func:`detr_tutorial.matcher.focal_class_cost`, log guarded by 1e-8
    where MMDetection's ``FocalLossCost`` uses 1e-12: equal unless a probability is below 1e-8).
    """

    def __init__(self, cls_weight: float = 2.0, reg_weight: float = 0.25, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0) -> None:
        if cls_weight < 0 or reg_weight < 0 or cls_weight + reg_weight == 0:
            raise ValueError(f"cls_weight and reg_weight must be >= 0 and not both 0, got {cls_weight}, {reg_weight}")
        self.cls_weight, self.reg_weight = cls_weight, reg_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: Tensor, codes: Tensor, labels: Tensor, boxes: Tensor) -> Tensor:
        """``logits (Q, K)``, ``codes (Q, >= 8)``, ``labels (n,)``, ``boxes (n, 7)`` -> cost ``(Q, n)``."""
        cls_cost = focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        reg_cost = torch.cdist(codes[:, :8], normalize_bbox(boxes)[:, :8], p=1)
        cost = self.cls_weight * cls_cost + self.reg_weight * reg_cost
        return torch.nan_to_num(cost, nan=100.0, posinf=100.0, neginf=-100.0)

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: Sequence[dict]) -> Indices:
        """``(query indices, target indices)`` per sample, sorted by query."""
        logits, codes = _check_outputs(outputs)
        _check_targets(targets, logits.shape[0], logits.shape[-1])
        indices = []
        for b, t in enumerate(targets):
            cost = self.cost_matrix(logits[b].float(), codes[b].float(), t["labels"], t["boxes"].float())
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


class Detr3DCriterion(nn.Module):
    """Focal classification + weighted L1 on the box code, for the last layer and every ``aux_outputs`` layer.

    Returns ``{"loss_cls", "loss_bbox", "loss_cls_0", "loss_bbox_0", ...}`` (``_i`` for aux layer ``i``), each
    already divided by the number of matched queries; ``weight_dict`` holds the official weights (2.0, 0.25).
    """

    def __init__(self, num_classes: int, assigner: Optional[HungarianAssigner3D] = None, num_aux: int = 0,
                 cls_weight: float = 2.0, bbox_weight: float = 0.25, code_weights: Optional[Sequence[float]] = None,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes, self.assigner = num_classes, assigner or HungarianAssigner3D()
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        code_weights = [1.0] * 8 if code_weights is None else list(code_weights)
        if len(code_weights) not in (8, 10):
            raise ValueError(f"code_weights must hold 8 or 10 numbers, got {len(code_weights)}")
        self.register_buffer("code_weights", torch.tensor(code_weights, dtype=torch.float32), persistent=False)
        suffixes = [""] + [f"_{i}" for i in range(num_aux)]
        self.weight_dict = {f"{k}{s}": w for s in suffixes for k, w in (("loss_cls", cls_weight),
                                                                          ("loss_bbox", bbox_weight))}

    def layer_loss(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        """``loss_cls`` and ``loss_bbox`` of one layer's ``pred_logits`` and ``pred_boxes``."""
        logits, codes = _check_outputs(outputs)
        if codes.shape[-1] != len(self.code_weights):
            raise ValueError(f"pred_boxes has {codes.shape[-1]} entries per code but code_weights has "
                             f"{len(self.code_weights)}")
        indices = self.assigner(outputs, targets)
        batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query = torch.cat([q for q, _ in indices]).to(logits.device)
        onehot = torch.zeros_like(logits)
        labels = torch.cat([t["labels"][g] for t, (_, g) in zip(targets, indices)]).to(logits.device)
        onehot[batch, query, labels] = 1.0
        num_pos = max(float(len(query)), 1.0)
        loss_cls = torchvision.ops.sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, "sum")
        gt = torch.cat([normalize_bbox(t["boxes"][g]) for t, (_, g) in zip(targets, indices)]).to(codes.device)
        pad = codes.shape[-1] - gt.shape[-1]  # targets without velocity against a 10-entry code: weight 0 there
        weights = self.code_weights * torch.cat([torch.ones(gt.shape[-1]), torch.zeros(pad)]).to(codes.device)
        gt = torch.cat([gt, gt.new_zeros(len(gt), pad)], -1)
        loss_bbox = ((codes[batch, query] - gt).abs() * weights).sum()
        return {"loss_cls": loss_cls / num_pos, "loss_bbox": loss_bbox / num_pos}

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        logits, _ = _check_outputs(outputs)
        _check_targets(targets, logits.shape[0], self.num_classes)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits has {logits.shape[-1]} classes, the criterion {self.num_classes}")
        losses = self.layer_loss(outputs, targets)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.layer_loss(aux, targets).items()})
        return losses


class NMSFreeCoder:
    """Top-k decoding without NMS (official ``NMSFreeCoder``): ``__call__(outputs)`` -> per sample
    ``{"boxes": (k, 7) (x, y, z, w, l, h, yaw), "scores": (k,), "labels": (k,)}``, sorted by score, ``k <=
    max_num``, boxes whose centre lies outside ``post_center_range`` (6 numbers) dropped.

    ``num_classes`` is checked against the logits; ``max_num`` larger than queries x classes takes them all.
    """

    def __init__(self, num_classes: int, post_center_range: Sequence[float], max_num: int = 300) -> None:
        if isinstance(max_num, bool) or not isinstance(max_num, int) or max_num < 1:
            raise ValueError(f"max_num must be a positive int, got {max_num!r}")
        if len(post_center_range) != 6:
            raise ValueError(f"post_center_range must be 6 numbers (min xyz, max xyz), got {post_center_range!r}")
        self.num_classes, self.max_num = num_classes, max_num
        self.post_center_range = tuple(float(v) for v in post_center_range)

    @torch.no_grad()
    def __call__(self, outputs: dict) -> list[dict[str, Tensor]]:
        logits, codes = _check_outputs(outputs)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits has {logits.shape[-1]} classes, the coder {self.num_classes}")
        results = []
        for scores, code in zip(logits.sigmoid(), codes):
            top, index = scores.flatten().topk(min(self.max_num, scores.numel()))
            labels, query = index % self.num_classes, index // self.num_classes
            boxes = denormalize_bbox(code[query].float())
            lo, hi = boxes.new_tensor(self.post_center_range[:3]), boxes.new_tensor(self.post_center_range[3:])
            keep = ((boxes[:, :3] >= lo) & (boxes[:, :3] <= hi)).all(1)
            results.append({"boxes": boxes[keep], "scores": top[keep], "labels": labels[keep]})
        return results


def post_center_range(pc_range: Sequence[float], margin: float = 10.0) -> tuple[float, ...]:
    """The official config's ``post_center_range``: ``pc_range`` widened by ``margin`` metres in x and y
    ([-61.2, 61.2] around [-51.2, 51.2]) and z in [-10, 10]."""
    return (pc_range[0] - margin, pc_range[1] - margin, -10.0, pc_range[3] + margin, pc_range[4] + margin, 10.0)


def build_detr3d_training(num_classes: int, max_num: int = 300,
                          **model_kwargs) -> tuple[nn.Module, nn.Module, Callable]:
    """DETR3D (``model_kwargs`` go to :func:`detr_tutorial.models.build_detr3d`), its criterion with the
    official weights and aux losses on every earlier layer, and the :class:`NMSFreeCoder`."""
    model = build_detr3d(num_classes=num_classes, **model_kwargs)
    criterion = Detr3DCriterion(num_classes, num_aux=len(model.layers) - 1)
    return model, criterion, NMSFreeCoder(num_classes, post_center_range(model.pc_range), max_num)


@dataclass(frozen=True)
class MultiViewConfig:
    """The multi-camera world's splits: ``num_train`` scenes with ``train_seed``, ``num_val`` held out with
    ``val_seed``, seen by ``num_cams`` cameras of ``image_hw`` pixels; ``min_objects..max_objects`` boxes
    ``distance`` metres away (see :class:`detr_tutorial.data.multiview.MultiViewDataset`)."""

    num_train: int = 2000
    num_val: int = 200
    num_cams: int = 6
    image_hw: tuple[int, int] = (64, 112)
    min_objects: int = 2
    max_objects: int = 8
    distance: tuple[float, float] = (3.0, 40.0)
    train_seed: int = 0
    val_seed: int = 1

    def dataset(self, split: str) -> MultiViewDataset:
        """The ``"train"`` or ``"val"`` split as a :class:`MultiViewDataset`."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        num, seed = (self.num_train, self.train_seed) if split == "train" else (self.num_val, self.val_seed)
        return MultiViewDataset(num, CameraRig(self.num_cams, tuple(self.image_hw)), self.min_objects,
                                self.max_objects, tuple(self.distance), seed=seed)


def multiview_loaders(data: MultiViewConfig, batch_size: int) -> tuple[DataLoader, DataLoader, tuple[str, ...]]:
    """Render both splits once, in memory -> ``(train, val, classes)`` loaders of ``(images (B, N, 3, H, W),
    lidar2img (B, N, 4, 4), targets)``; shuffling as :func:`detr_tutorial.data.shapes_loaders` does."""
    if not isinstance(data, MultiViewConfig):
        raise TypeError(f"data must be a MultiViewConfig, got {type(data).__name__}")
    train_set, val_set = data.dataset("train"), data.dataset("val")
    train = [train_set[i] for i in range(len(train_set))]
    val = [val_set[i] for i in range(len(val_set))]
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                              collate_fn=multiview_collate)
    val_loader = DataLoader(val, batch_size=16, collate_fn=multiview_collate, generator=torch.Generator())
    return train_loader, val_loader, train_set.classes


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, postprocess: Callable,
            device: torch.device | str = "cpu") -> tuple[list[dict], list[dict]]:
    """Decoded detections and targets (on the CPU) of every scene of ``loader``, in order."""
    was_training = model.training
    model.eval()
    predictions, all_targets = [], []
    try:
        for images, lidar2img, targets in loader:
            results = postprocess(model(images.to(device), lidar2img.to(device)))
            predictions += [{k: v.cpu() for k, v in r.items()} for r in results]
            all_targets += targets
    finally:
        model.train(was_training)
    return predictions, all_targets


def seen_targets(target: dict) -> dict:
    """``target`` without the boxes that no camera shows (``visible_pixels`` all 0): the analogue of the
    nuScenes evaluation dropping ground-truth boxes without a LiDAR or radar point (``filter_eval_boxes``)."""
    seen = target["visible_pixels"].sum(1) > 0
    return {**target, "boxes": target["boxes"][seen], "labels": target["labels"][seen],
            "visible_pixels": target["visible_pixels"][seen]}


def evaluate_detr3d(model: nn.Module, loader: Iterable, postprocess: Callable,
                    classes: Optional[Sequence[str]] = None, device: torch.device | str = "cpu") -> dict[str, float]:
    """nuScenes-style detection scores of ``model`` on ``loader`` (:func:`detr_tutorial.evaluation3d.nuscenes_map`,
    thresholds 0.5, 1, 2, 4 m) against the boxes some camera shows (:func:`seen_targets`): ``mAP``, ``mATE``,
    ``mASE``, ``mAOE`` and ``AP_<class>`` (mean over thresholds), as plain floats. The signature is the
    :class:`~detr_tutorial.engine.Trainer`'s ``evaluator``."""
    if classes is None:
        classes = getattr(getattr(loader, "dataset", None), "classes", None) or MultiViewDataset.classes
    return detr3d_scores(*predict(model, loader, postprocess, device), classes)


def detr3d_scores(predictions: Sequence[dict], targets: Sequence[dict], classes: Sequence[str]) -> dict[str, float]:
    """:func:`evaluate_detr3d`'s scores of decoded ``predictions`` against ``targets``, one dict per scene each."""
    result = nuscenes_map(predictions, [seen_targets(t) for t in targets], list(classes))
    return {"mAP": result["mAP"], **{k: result[k] for k in ("mATE", "mASE", "mAOE")},
            **{f"AP_{name}": ap for name, ap in result["class_AP"].items()}}
