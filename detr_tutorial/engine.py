"""The training loop of the DETR family, model-agnostic.

DETR's recipe: AdamW with a 10x smaller learning rate for the backbone (the
parameters whose name contains ``"backbone"``), weight decay 1e-4, gradient
clipping at norm 0.1, and a step schedule that divides the learning rate by
10 after ``lr_drop`` epochs. Small models learn faster with a linear
warm-up, which :class:`TrainConfig` adds as an option.

:class:`Trainer` runs that recipe on any ``model(images, mask) -> outputs``
and ``criterion(outputs, targets) -> loss dict`` with a ``weight_dict``: it
logs every step, evaluates every few epochs with pycocotools, writes
checkpoints (model, optimizer, schedule, counters and RNG states, so a resumed
run takes exactly the step the uninterrupted one would have) and stops with
:class:`NonFiniteLossError` when the loss turns NaN or infinite.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .evaluation import evaluate_model

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "build_optimizer", "build_scheduler"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the loss terms."""


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the official DETR recipe).

    ``lr_drop`` is counted in epochs, ``warmup_steps`` in optimiser steps;
    ``eval_every`` evaluates after every that many epochs (0: only at the end,
    when a validation loader is given); ``max_seconds`` stops training once
    that much wall time has been spent on training steps (None: no limit; the
    interrupted epoch is then evaluated and counted as the last one).
    """

    epochs: int = 300
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: int = 200
    lr_gamma: float = 0.1
    warmup_steps: int = 0
    clip_max_norm: float = 0.1
    eval_every: int = 1
    max_seconds: Optional[float] = None

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("lr_drop", 1), ("warmup_steps", 0), ("eval_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("lr", "lr_backbone", "weight_decay", "lr_gamma", "clip_max_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive or None, got {self.max_seconds!r}")


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two parameter groups: the backbone (``lr_backbone``) and the rest (``lr``).

    Uses PyTorch's fused AdamW kernel when every parameter is on the CPU or a
    CUDA device (same update, one kernel instead of several per tensor).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "backbone" not in n], "lr": config.lr},
              {"params": [p for n, p in named if "backbone" in n], "lr": config.lr_backbone}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for _, p in named)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, weight_decay=config.weight_decay,
                             fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up over ``warmup_steps``, then x ``lr_gamma`` every ``lr_drop`` epochs."""
    warmup, drop_steps, gamma = config.warmup_steps, config.lr_drop * steps_per_epoch, config.lr_gamma

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup if warmup else 1.0) * gamma ** (step // drop_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to(targets: Sequence[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]


class Trainer:
    """Train ``model`` with ``criterion`` on ``train_loader`` following ``config``.

    Args:
        model: ``model(images (B, 3, H, W), mask (B, H, W)) -> outputs`` dict.
        criterion: ``criterion(outputs, targets) -> {name: scalar}`` with a
            ``weight_dict`` attribute naming the terms summed into the loss.
        train_loader: iterable of ``(images, mask, targets)`` with a ``len``.
        config: the optimisation settings.
        val_loader, postprocess, classes: when given, COCO AP on ``val_loader``
            (see :func:`detr_tutorial.evaluation.evaluate_model`).
        device: where to train.
        out_dir: if set, ``checkpoint.pth`` and ``metrics.jsonl`` (one JSON
            record per epoch) are written there.
        callbacks: ``callback(trainer, record)`` after each epoch's record.
        progress: show tqdm progress bars.

    After :meth:`fit`, ``step_log`` holds one dict per step (``step``,
    ``epoch``, ``loss``, ``lr`` and every loss term) and ``epoch_log`` one per
    epoch (mean losses, ``train_seconds``, and the metrics when evaluated).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, train_loader: Iterable, config: TrainConfig,
                 val_loader: Optional[Iterable] = None, postprocess: Optional[Callable] = None,
                 classes: Optional[Sequence[str]] = None, device: torch.device | str = "cpu",
                 out_dir: Optional[str | Path] = None, callbacks: Sequence[Callable] = (),
                 progress: bool = True) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not hasattr(criterion, "weight_dict"):
            raise TypeError("criterion must have a weight_dict attribute (loss name -> weight)")
        if val_loader is not None and postprocess is None:
            raise ValueError("postprocess is required to evaluate on val_loader")
        if len(train_loader) == 0:
            raise ValueError("train_loader yields no batches")
        self.device = torch.device(device)
        self.model, self.criterion = model.to(self.device), criterion.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.postprocess, self.classes, self.config = postprocess, classes, config
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.callbacks, self.progress = list(callbacks), progress
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config, len(train_loader))
        self.epoch, self.step, self.train_seconds = 0, 0, 0.0
        self.step_log: list[dict] = []
        self.epoch_log: list[dict] = []

    def train_step(self, images: Tensor, mask: Tensor, targets: Sequence[dict]) -> dict[str, float]:
        """One optimiser step; returns the step's log record."""
        outputs = self.model(images.to(self.device), mask.to(self.device))
        loss_dict = self.criterion(outputs, _to(targets, self.device))
        weights = self.criterion.weight_dict
        loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items())
            raise NonFiniteLossError(f"loss is {loss.item()} at step {self.step} (epoch {self.epoch}); "
                                     f"loss terms: {terms}")
        self.optimizer.zero_grad()
        loss.backward()
        if self.config.clip_max_norm > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_max_norm)
        record = {"step": self.step, "epoch": self.epoch, "loss": loss.item(),
                  "lr": self.optimizer.param_groups[0]["lr"], **{k: v.item() for k, v in loss_dict.items()}}
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return record

    def train_one_epoch(self) -> dict[str, float]:
        """One pass over ``train_loader`` (or until ``max_seconds``); returns the epoch's mean losses."""
        self.model.train()
        self.criterion.train()
        records = []
        # at most one refresh every 2 s: a notebook kernel sends one message per refresh, and a
        # long cell's flood of messages can overflow the client's queue (nbval then loses output)
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch}", disable=not self.progress, leave=False,
                   mininterval=2.0)
        for images, mask, targets in bar:
            start = time.perf_counter()
            records.append(self.train_step(images, mask, targets))
            self.train_seconds += time.perf_counter() - start
            bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", refresh=False)
            if self.out_of_time():
                break
        bar.close()
        self.step_log += records
        keys = [k for k in records[0] if k not in ("step", "epoch", "lr")]
        return {k: float(np.mean([r[k] for r in records])) for k in keys}

    def out_of_time(self) -> bool:
        return self.config.max_seconds is not None and self.train_seconds >= self.config.max_seconds

    def evaluate(self) -> dict[str, float]:
        """COCO metrics on ``val_loader``."""
        if self.val_loader is None:
            raise ValueError("evaluate needs a val_loader")
        return evaluate_model(self.model, self.val_loader, self.postprocess, self.classes, self.device)

    def fit(self) -> list[dict]:
        """Train until ``config.epochs`` epochs (or ``max_seconds``); returns ``epoch_log``."""
        cfg = self.config
        for _ in tqdm(range(self.epoch, cfg.epochs), desc="training", disable=not self.progress,
                      initial=self.epoch, total=cfg.epochs):
            record = {"epoch": self.epoch, **self.train_one_epoch()}
            self.epoch += 1
            last = self.epoch == cfg.epochs or self.out_of_time()
            record.update(step=self.step, train_seconds=round(self.train_seconds, 3))
            if self.val_loader is not None and ((cfg.eval_every and self.epoch % cfg.eval_every == 0) or last):
                record.update(self.evaluate())
            self.epoch_log.append(record)
            for callback in self.callbacks:
                callback(self, record)
            if self.out_dir is not None:
                self._write(record)
            if last:
                break
        return self.epoch_log

    def _write(self, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.save_checkpoint(self.out_dir / "checkpoint.pth")

    def state_dict(self) -> dict:
        """Everything a resumed run needs to take the same next step."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "train_seconds": self.train_seconds, "config": asdict(self.config),
                "step_log": self.step_log, "epoch_log": self.epoch_log,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.train_seconds = state["epoch"], state["step"], state["train_seconds"]
        self.step_log, self.epoch_log = list(state["step_log"]), list(state["epoch_log"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def save_checkpoint(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
