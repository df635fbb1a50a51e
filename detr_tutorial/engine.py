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
run takes exactly the step the uninterrupted one would have; see
:mod:`detr_tutorial.run_dir` for the files) and stops with
:class:`NonFiniteLossError` at the step where training diverges, before the
optimiser step (see :mod:`detr_tutorial.divergence`).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoints import check_state_dict
from .distributed import any_rank, mean_record
from .divergence import NonFiniteLossError, diverged, non_finite_outputs
from .evaluation import evaluate_model
from .run_dir import (CHECKPOINT, METRICS, ResumeMismatchError, check_out_dir, check_training_state, get_rng_state,
                      read_training_checkpoint, save_checkpoint, set_rng_state, write_jsonl)

__all__ = ["NonFiniteLossError", "ResumeMismatchError", "TrainConfig", "Trainer", "build_optimizer", "build_scheduler"]


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the official DETR recipe).

    ``lr_drop`` is counted in epochs, ``warmup_steps`` in optimiser steps;
    ``eval_every`` evaluates after every that many epochs (0: only at the end,
    when a validation loader is given); ``max_seconds`` stops a call of ``fit``
    once it has spent that much wall time on training steps (None: no limit;
    the cut epoch is then evaluated, counted, and its record marked ``"partial": true``).
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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
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
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
    warmup, drop_steps, gamma = config.warmup_steps, config.lr_drop * steps_per_epoch, config.lr_gamma

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup if warmup else 1.0) * gamma ** (step // drop_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to(targets: Sequence[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]


class Trainer:
    """Train ``model`` with ``criterion`` on ``train_loader`` following ``config``.

    Args:
        model: ``model(images (B, 3, H, W), mask (B, H, W)) -> outputs`` dict; ``model(images, mask, targets)``
            in training if the model has ``takes_targets = True``.
        criterion: ``criterion(outputs, targets) -> {name: scalar}`` with a
            ``weight_dict`` attribute naming the terms summed into the loss.
        train_loader: iterable of ``(images, mask, targets)`` with a ``len``.
        config: the optimisation settings.
        val_loader, postprocess, classes: when given, COCO AP on ``val_loader``
            (see :func:`detr_tutorial.evaluation.evaluate_model`).
        device: where to train.
        out_dir: if set, ``checkpoint.pth`` and ``metrics.jsonl`` (one JSON
            record per epoch) are written there after every epoch. A folder that
            already holds another run is refused (resume it with
            :meth:`load_checkpoint`, or delete its files).
        callbacks: ``callback(trainer, record)`` after each epoch's record.
        progress: show tqdm progress bars.
        evaluator: ``evaluator(model, val_loader, postprocess, classes, device) -> metrics``
            replacing :func:`detr_tutorial.evaluation.evaluate_model` (COCO AP), e.g. DETR3D's
            nuScenes-style mAP.
        run: what else defines the run (e.g. model name and data settings, as
            :func:`detr_tutorial.presets.make_trainer` passes); stored in the
            checkpoint, and a resumed run must match it.

    After :meth:`fit`, ``step_log`` holds one dict per step (``step``,
    ``epoch``, ``loss``, ``lr`` and every loss term) and ``epoch_log`` one per
    epoch (mean losses, ``train_seconds``, and the metrics when evaluated).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, train_loader: Iterable, config: TrainConfig,
                 val_loader: Optional[Iterable] = None, postprocess: Optional[Callable] = None,
                 classes: Optional[Sequence[str]] = None, device: torch.device | str = "cpu",
                 out_dir: Optional[str | Path] = None, callbacks: Sequence[Callable] = (),
                 progress: bool = True, run: Optional[dict] = None, evaluator: Optional[Callable] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not hasattr(train_loader, "__len__"):
            raise TypeError(f"train_loader must have a len (a DataLoader), got {type(train_loader).__name__}")
        if not hasattr(criterion, "weight_dict"):
            raise TypeError("criterion must have a weight_dict attribute (loss name -> weight)")
        if val_loader is not None and postprocess is None:
            raise ValueError("postprocess is required to evaluate on val_loader")
        if len(train_loader) == 0:
            raise ValueError("train_loader yields no batches")
        self.device = torch.device(device)
        self.model, self.criterion = model.to(self.device), criterion.to(self.device)
        self.forward_model: nn.Module = self.model  # the model's DDP wrapper under torchrun (see .distributed)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.postprocess, self.classes, self.config, self.run = postprocess, classes, config, run
        self.evaluator = evaluate_model if evaluator is None else evaluator
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.callbacks, self.progress = list(callbacks), progress
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config, len(train_loader))
        self.epoch, self.step, self.train_seconds = 0, 0, 0.0
        self.step_log: list[dict] = []
        self.epoch_log: list[dict] = []
        self.continues: Optional[Path] = None  # the checkpoint this run was loaded from or fit() wrote
        self._budget_start = 0.0  # train_seconds when the current fit began (max_seconds counts from there)

    def train_step(self, images: Tensor, mask: Tensor, targets: Sequence[dict]) -> dict[str, float]:
        """One optimiser step; returns the step's log record. Stops with :class:`NonFiniteLossError`
        before the step if the outputs, the loss or the gradient norm are NaN or infinite."""
        outputs = self._forward(images, mask, targets)
        loss_dict = self.criterion(outputs, _to(targets, self.device))
        weights = self.criterion.weight_dict
        loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
        if not torch.isfinite(loss):
            self._diverged(f"loss is {loss.item()}", loss_dict)
        self.optimizer.zero_grad()
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm.item()}", loss_dict)
        if self.config.clip_max_norm > 0:
            nn.utils.clip_grads_with_norm_(params, self.config.clip_max_norm, grad_norm)
        record = {"step": self.step, "epoch": self.epoch, "loss": loss.item(),
                  "lr": self.optimizer.param_groups[0]["lr"], **{k: v.item() for k, v in loss_dict.items()}}
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return record

    def _forward(self, images: Tensor, mask: Tensor, targets: Sequence[dict]) -> dict:
        """The forward pass; a model with ``takes_targets = True`` (DN-DETR, DINO: denoising queries made from
        the targets) also gets ``targets``."""
        inputs = (images.to(self.device), mask.to(self.device))
        if getattr(self.model, "takes_targets", False):
            inputs += (_to(targets, self.device),)
        try:
            outputs = self.forward_model(*inputs)
        except ValueError as error:  # the library's own checks on non-finite activations
            if "finite" not in str(error):
                raise
            self._diverged(f"the forward pass stopped on non-finite values ({error})", None, error)
        bad = non_finite_outputs(outputs)
        if bad:
            self._diverged(f"outputs are not finite: {', '.join(bad)}", None)
        return outputs

    def _diverged(self, what: str, loss_dict: Optional[dict], cause: Optional[BaseException] = None) -> None:
        raise diverged(what, self.step, self.epoch, self.model, loss_dict, self.step_log) from cause

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
            records.append(mean_record(self.train_step(images, mask, targets)))  # under DDP, the global batch's
            self.train_seconds += time.perf_counter() - start
            self.step_log.append(records[-1])
            bar.set_postfix(loss=f"{records[-1]['loss']:.3f}", refresh=False)
            if self.out_of_time():
                break
        bar.close()
        keys = [k for k in records[0] if k not in ("step", "epoch", "lr")]
        return {k: float(np.mean([r[k] for r in records])) for k in keys}

    def out_of_time(self) -> bool:
        """Whether this call of :meth:`fit` has used up ``config.max_seconds`` of training time (on any rank)."""
        return self.config.max_seconds is not None and \
            any_rank(self.train_seconds - self._budget_start >= self.config.max_seconds)

    def evaluate(self) -> dict[str, float]:
        """The evaluator's metrics (COCO AP by default) on ``val_loader``."""
        if self.val_loader is None:
            raise ValueError("evaluate needs a val_loader")
        return self.evaluator(self.model, self.val_loader, self.postprocess, self.classes, self.device)

    def fit(self) -> list[dict]:
        """Train until ``config.epochs`` epochs (or ``max_seconds``); returns ``epoch_log``."""
        cfg = self.config
        if self.epoch > cfg.epochs:
            raise ValueError(f"config.epochs is {cfg.epochs} but {self.epoch} epochs are already trained")
        if self.out_dir is not None:
            check_out_dir(self.out_dir, self.continues)
        self._budget_start = self.train_seconds
        bar = tqdm(total=cfg.epochs, initial=self.epoch, desc="training", disable=not self.progress)
        try:
            while self.epoch < cfg.epochs:
                first_step = self.step
                record = {"epoch": self.epoch, **self.train_one_epoch()}
                self.epoch += 1
                record.update(step=self.step, train_seconds=round(self.train_seconds, 3))
                if self.step - first_step < len(self.train_loader):
                    record["partial"] = True  # cut by max_seconds
                stop = self.epoch == cfg.epochs or self.out_of_time()
                if self.val_loader is not None and ((cfg.eval_every and self.epoch % cfg.eval_every == 0) or stop):
                    record.update(self.evaluate())
                self.epoch_log.append(record)
                for callback in self.callbacks:
                    callback(self, record)
                if self.out_dir is not None:
                    self._write()
                bar.update()
                if stop:
                    break
        finally:
            bar.close()
        return self.epoch_log

    def _write(self) -> None:
        """The checkpoint first, then the records rewritten from its ``epoch_log`` (never ahead of it)."""
        self.save_checkpoint(self.out_dir / CHECKPOINT)
        self.continues = self.out_dir / CHECKPOINT
        write_jsonl(self.out_dir / METRICS, self.epoch_log)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to take the same next step (tensors and plain values only)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "train_seconds": self.train_seconds, "config": asdict(self.config), "run": self.run,
                "steps_per_epoch": len(self.train_loader), "step_log": self.step_log, "epoch_log": self.epoch_log,
                "rng": get_rng_state(), "classes": None if self.classes is None else list(self.classes)}

    def load_state_dict(self, state: Mapping, source: str = "the state dict") -> None:
        """Restore :meth:`state_dict`'s output. Everything is checked first; on an error nothing changes.

        Raises:
            ValueError: an entry is missing or malformed (``source`` names where the state came from).
            CheckpointMismatchError: the model's keys or shapes differ.
            ResumeMismatchError: the checkpoint's settings differ from this run's (see
                :func:`detr_tutorial.run_dir.resume_conflicts`).
        """
        check_training_state(state, self.optimizer, asdict(self.config), self.run, len(self.train_loader), source)
        check_state_dict(self.model, state["model"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.train_seconds = state["epoch"], state["step"], state["train_seconds"]
        self.step_log, self.epoch_log = list(state["step_log"]), list(state["epoch_log"])
        self._budget_start = self.train_seconds
        set_rng_state(state["rng"])

    def save_checkpoint(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (an interrupt leaves the previous file intact)."""
        save_checkpoint(self.state_dict(), path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a checkpoint that :meth:`save_checkpoint` wrote (loaded with ``weights_only=True``)."""
        self.load_state_dict(read_training_checkpoint(path, map_location=self.device), source=str(path))
        self.continues = Path(path)
