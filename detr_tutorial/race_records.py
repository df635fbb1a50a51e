"""The convergence race (chapters 13, 16 and 24): its recorded command-line runs, and its live runs.

``python -m detr_tutorial.train --out runs/race/<short>_<setting> ...`` writes ``commands.jsonl`` (one
record per invocation: the command, the preset, the outcome) and ``metrics.jsonl`` (one record per
epoch). The book keeps copies of both under ``book/race_runs/<short>_<setting>/``, where ``short`` names
the model (:data:`SHORT_NAMES`) and ``setting`` the data and schedule (``64``, ``128_small``, ``128_small_long``, ...).
:func:`live_race` trains the first epochs of the same runs in the calling process and returns them in
:func:`load_run`'s form.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .notebook import seed_everything
from .presets import get_preset, make_trainer

__all__ = ["DEFAULT_OBJECT_SIZE", "SHORT_NAMES", "first_epoch_reaching", "live_race", "load_records", "load_run",
           "object_size"]

#: ``DataConfig.object_size``'s default; records written before the field existed used it.
DEFAULT_OBJECT_SIZE = (0.15, 0.5)

#: model name (``--model``) -> the short name that starts its run folders.
SHORT_NAMES = {"detr": "detr", "deformable_detr": "deformable", "conditional_detr": "conditional", "dab_detr": "dab",
               "dn_detr": "dn", "dino": "dino"}


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a recorded run needs the commands.jsonl and metrics.jsonl "
                                "that python -m detr_tutorial.train wrote")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def load_run(folder: str | Path) -> dict:
    """One recorded run: its last ``command`` and all its ``commands`` (a resumed run has one per invocation),
    its ``data`` settings and ``lr_drop``, and per epoch the held-out ``AP50`` and ``AP``, the cumulative
    training ``seconds`` and the cumulative ``epoch_steps`` (arrays of length epochs), plus the total ``steps``."""
    folder = Path(folder)
    commands, metrics = _jsonl(folder / "commands.jsonl"), _jsonl(folder / "metrics.jsonl")
    missing = [r.get("epoch") for r in metrics if "AP50" not in r]
    if missing:
        raise ValueError(f"{folder / 'metrics.jsonl'}: epochs {missing} were not evaluated (run with eval_every=1)")
    return {"command": commands[-1]["command"], "commands": [r["command"] for r in commands],
            "data": commands[-1]["preset"]["data"], "lr_drop": commands[-1]["preset"]["train"]["lr_drop"],
            "AP50": np.array([r["AP50"] for r in metrics]), "AP": np.array([r["AP"] for r in metrics]),
            "seconds": np.array([r["train_seconds"] for r in metrics]),
            "epoch_steps": np.array([r["step"] for r in metrics]), "steps": metrics[-1]["step"]}


def load_records(root: str | Path) -> dict[str, dict[str, dict]]:
    """Every run under ``root`` as ``{setting: {short: run}}`` (folders named ``<short>_<setting>``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder of recorded runs at {root}")
    recorded: dict[str, dict[str, dict]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        short, sep, setting = folder.name.partition("_")
        if not sep:
            raise ValueError(f"{folder.name!r} is not named <model>_<setting>, e.g. 'detr_128_small'")
        recorded.setdefault(setting, {})[short] = load_run(folder)
    return recorded


def object_size(run: dict) -> tuple[float, float]:
    """The run's ``(min, max)`` object side as fractions of the image side."""
    return tuple(run["data"].get("object_size", DEFAULT_OBJECT_SIZE))


def first_epoch_reaching(curve: np.ndarray, bar: float) -> Optional[int]:
    """1-based epoch at which ``curve`` (one value per epoch) first reaches ``bar``; None if it never does."""
    hits = np.flatnonzero(np.asarray(curve) >= bar)
    return int(hits[0]) + 1 if len(hits) else None


def live_race(model: str, epochs: int = 2, preset: str = "race", data: Optional[dict] = None, seed: int = 0) -> dict:
    """Train ``model`` for the first ``epochs`` epochs of ``preset`` (with ``DataConfig`` fields ``data``, as the
    CLI's ``--image-size`` and ``--object-size`` set them) in this process, seeded as ``python -m
    detr_tutorial.train --seed`` seeds, and return the run as :func:`load_run` does (``command``, ``commands``
    and ``lr_drop`` aside), plus ``epoch_log`` (the trainer's records) and ``cpu_seconds``, the CPU time of this
    process over the whole call: building, training and evaluation. ``seconds`` is the trainer's wall-clock
    training time."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    settings = get_preset(preset, data=data, epochs=epochs)
    if settings.train.eval_every != 1:
        raise ValueError(f"preset {preset!r} evaluates every {settings.train.eval_every} epochs; a race needs "
                         "AP after every epoch (eval_every=1)")
    start = time.process_time()
    seed_everything(seed)
    trainer = make_trainer(settings, model=model, progress=False)
    log = trainer.fit()
    return {"data": dataclasses.asdict(settings.data), "AP50": np.array([r["AP50"] for r in log]),
            "AP": np.array([r["AP"] for r in log]), "seconds": np.array([r["train_seconds"] for r in log]),
            "epoch_steps": np.array([r["step"] for r in log]), "steps": trainer.step, "epoch_log": log,
            "cpu_seconds": time.process_time() - start}
