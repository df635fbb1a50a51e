"""The files of a training run: atomic checkpoints, per-epoch records, RNG states, the code version.

A run folder holds ``checkpoint.pth`` (what a resumed run needs), ``metrics.jsonl``
(one JSON record per finished epoch) and, when written by the command line,
``commands.jsonl``. Every file is replaced atomically: it is written to a
temporary file in the same folder and moved over the old one with
:func:`os.replace`, so an interrupt (Ctrl-C, a full disk, a killed job) leaves
either the old file or the new one, never half of one. The checkpoint is
written before the records, and the records are rewritten from the
checkpoint's own ``epoch_log``, so ``metrics.jsonl`` never runs ahead of the
checkpoint and a resumed run never repeats an epoch in it.

Files are loaded with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary Python objects (the library's checkpoints store
their RNG states as tensors for that reason).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["CHECKPOINT", "METRICS", "COMMANDS", "CheckpointError", "ResumeMismatchError", "atomic_write",
           "check_training_state", "code_version",
           "existing_run_files", "get_rng_state", "read_jsonl", "read_training_checkpoint", "read_weights",
           "resume_conflicts", "save_checkpoint", "set_rng_state", "write_jsonl"]

CHECKPOINT, METRICS, COMMANDS = "checkpoint.pth", "metrics.jsonl", "commands.jsonl"
#: the entries of a training checkpoint written by :class:`detr_tutorial.engine.Trainer`.
TRAINING_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "train_seconds", "config", "step_log",
                 "epoch_log", "rng")


class CheckpointError(ValueError):
    """A file is not the checkpoint it was expected to be (unreadable, truncated, or of another kind)."""


class ResumeMismatchError(ValueError):
    """A checkpoint was trained with settings that the resuming run contradicts.

    ``conflicts``: ``(setting, this run's value, the checkpoint's value)`` tuples."""

    def __init__(self, source: str, conflicts: list[tuple[str, Any, Any]]) -> None:
        self.conflicts = conflicts
        super().__init__(f"cannot resume from {source}: " + "; ".join(
            f"{name} is {ours!r} here but {theirs!r} in the checkpoint" for name, ours, theirs in conflicts))


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: the old file stays, the partial one goes
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: Mapping, path: str | Path) -> None:
    """``torch.save(state, path)``, atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Replace ``path`` by one JSON line per record, atomically."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def existing_run_files(folder: str | Path) -> list[str]:
    """The run files (checkpoint, metrics, commands) that ``folder`` already holds."""
    return [name for name in (CHECKPOINT, METRICS, COMMANDS) if (Path(folder) / name).exists()]


def read_weights(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'not a file' if path.exists() else 'no such checkpoint file'}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[-1][:300]
        raise CheckpointError(f"{path} holds Python objects other than tensors and plain containers, which a "
                              f"weights-only load refuses ({first}); if you trust the file, load it with "
                              f"torch.load(..., weights_only=False) and pass the dict on") from error
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} ({path.stat().st_size} bytes) cannot be read as a PyTorch file: it is "
                              f"truncated or corrupt ({type(error).__name__}: {str(error)[:200]})") from error


def _describe(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return f"model weights only (a state dict of {len(obj)} tensors)"
    if "model" in obj:
        return f"model weights only (a dict with keys {sorted(map(str, obj))})"
    return f"a dict with keys {sorted(map(str, obj))[:12]}"


def read_training_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :class:`detr_tutorial.engine.Trainer`; :class:`CheckpointError` otherwise."""
    state = read_weights(path, map_location)
    if not isinstance(state, Mapping) or any(k not in state for k in TRAINING_KEYS):
        raise CheckpointError(
            f"{path} holds {_describe(state)}, not a training checkpoint: resuming needs the checkpoint.pth "
            f"that detr_tutorial's Trainer writes (keys {', '.join(TRAINING_KEYS)}); to start a new run from "
            f"pretrained weights, load them into the model with detr_tutorial.checkpoints.load_official_detr")
    return dict(state)


#: ``TrainConfig`` fields that change the steps a run takes: a resumed run must keep the checkpoint's.
FIXED_TRAIN_FIELDS = ("lr", "lr_backbone", "weight_decay", "lr_drop", "lr_gamma", "warmup_steps", "clip_max_norm")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as a JSON record holds them


def resume_conflicts(state: Mapping, config: Mapping, run: Mapping | None,
                     steps_per_epoch: int | None) -> list[tuple[str, Any, Any]]:
    """``(setting, this run's value, the checkpoint's value)`` for each setting a resumed run may not change.

    ``config``: the resuming run's ``TrainConfig`` as a dict; ``run``: its
    description (model name, data, batch size, model settings), compared
    entry by entry (``"data.image_size"``) with the checkpoint's when both have
    one. ``epochs`` may grow but not fall below the epochs already trained;
    ``eval_every`` and ``max_seconds`` may change (they do not change the steps).
    """
    conflicts = [(f"train.{k}", config[k], state["config"][k]) for k in FIXED_TRAIN_FIELDS
                 if k in state["config"] and config[k] != state["config"][k]]
    if config["epochs"] < state["epoch"]:
        conflicts.append(("train.epochs", config["epochs"], f"{state['epoch']} epochs already trained"))
    if steps_per_epoch is not None and state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        conflicts.append(("steps_per_epoch", steps_per_epoch, state["steps_per_epoch"]))
    if run is not None and state.get("run") is not None:
        ours, theirs = _plain(dict(run)), _plain(dict(state["run"]))
        for key in sorted(set(ours) | set(theirs)):
            a, b = ours.get(key), theirs.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                conflicts += [(f"{key}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                              if a.get(k) != b.get(k)]
            elif a != b:
                conflicts.append((key, a, b))
    return conflicts


def check_training_state(state: Mapping, optimizer: torch.optim.Optimizer, config: Mapping, run: Mapping | None,
                         steps_per_epoch: int, source: str) -> None:
    """Check a training checkpoint against the run that wants to continue it (all but the model's weights).

    Raises:
        ValueError: an entry is missing or malformed (``source`` names the file).
        ResumeMismatchError: see :func:`resume_conflicts`.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{source} must be a dict as Trainer.state_dict() returns, got {type(state).__name__}")
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise ValueError(f"{source} lacks the training-checkpoint entries {missing}")
    for name in ("optimizer", "scheduler", "config"):
        if not isinstance(state[name], Mapping):
            raise ValueError(f"{source}: {name} must be a dict, got {type(state[name]).__name__}")
    theirs = [len(g["params"]) for g in state["optimizer"].get("param_groups", [])]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if theirs != ours:
        raise ValueError(f"{source}: the optimizer's parameter groups hold {theirs} tensors, this model's {ours}")
    for name in ("epoch", "step"):
        if isinstance(state[name], bool) or not isinstance(state[name], int) or state[name] < 0:
            raise ValueError(f"{source}: {name} must be an int >= 0, got {state[name]!r}")
    check_rng_state(state["rng"])
    conflicts = resume_conflicts(state, config, run, steps_per_epoch)
    if conflicts:
        raise ResumeMismatchError(source, conflicts)


def get_rng_state() -> dict:
    """The torch, CUDA, numpy and Python RNG states, as tensors and plain values (weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_rng_state(state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` is what :func:`get_rng_state` returns."""
    if not (isinstance(state, Mapping) and isinstance(state.get("torch"), Tensor)
            and isinstance(state.get("numpy"), Mapping) and isinstance(state["numpy"].get("keys"), Tensor)
            and isinstance(state.get("python"), tuple)):
        raise ValueError("the RNG state must be a dict with torch (tensor), numpy (dict of keys, pos, has_gauss, "
                         "gauss) and python (tuple) entries, as get_rng_state() returns")


def set_rng_state(state: Mapping) -> None:
    """Restore the RNG states that :func:`get_rng_state` returned."""
    check_rng_state(state)
    n = state["numpy"]
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _git(*args: str) -> str:
    folder = Path(__file__).resolve().parent
    done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20)
    if done.returncode:
        raise OSError(done.stderr.strip())
    return done.stdout.strip()


def code_version() -> dict:
    """``{"commit": sha, "dirty": bool}`` of the git checkout this library runs from.

    ``{"commit": "unknown", "dirty": None}`` when the library is not a tracked
    file of a git checkout (an installed copy) or git is missing. ``dirty``:
    the library's files differ from the commit (uncommitted or untracked changes).
    """
    try:
        _git("ls-files", "--error-unmatch", "__init__.py")  # tracked, not an installed copy inside a repo
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}
