"""Command line training: ``python -m detr_tutorial.train --model detr --preset shapes_cpu --out runs/x``.

Trains a registered model (:data:`detr_tutorial.presets.MODELS`) with a named
preset (:data:`detr_tutorial.presets.PRESETS`) using the book's engine. The
output folder receives ``checkpoint.pth`` (after every epoch) and
``metrics.jsonl`` (one JSON record per epoch: mean losses, step, training
seconds and, when evaluated, the COCO metrics on the held-out split) and
``commands.jsonl`` (one record per invocation: the exact command line, the
resolved preset, threads and library versions), so that a recorded result
can always be traced to the command that produced it. ``--resume``
continues from a checkpoint, taking exactly the steps the uninterrupted run
would have taken.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .notebook import seed_everything
from .presets import MODELS, PRESETS, Preset, get_preset, make_trainer

__all__ = ["main", "parse_args", "record_command", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """"cpu", "cuda" or "auto" (CUDA when available) -> ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def record_command(out: str | Path, argv: Sequence[str], preset: Preset, model: str,
                   device: torch.device) -> dict:
    """Append this invocation to ``out/commands.jsonl`` and return the record."""
    record = {"command": shlex.join(["python", "-m", "detr_tutorial.train", *argv]), "model": model,
              "preset": dataclasses.asdict(preset), "device": str(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version()}
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "commands.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return record


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m detr_tutorial.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="detr", choices=sorted(MODELS), help="architecture (default: detr)")
    p.add_argument("--preset", default="shapes_cpu", choices=sorted(PRESETS), help="data + optimisation settings")
    p.add_argument("--epochs", type=int, default=None, help="total epochs (default: the preset's)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every K epochs (0: only at the end)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the synthetic images in pixels (default: the preset's); objects scale with it")
    p.add_argument("--object-size", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="side of the shapes as fractions of the image side (default: the preset's)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this much training time")
    p.add_argument("--out", required=True, help="output folder for checkpoint.pth and metrics.jsonl")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("eval_every", args.eval_every),
                                   ("max_seconds", args.max_seconds)) if v is not None}
    data = {k: v for k, v in (("image_size", args.image_size),
                              ("object_size", None if args.object_size is None else tuple(args.object_size)))
            if v is not None}
    preset = get_preset(args.preset, data=data, **overrides)
    record_command(args.out, argv, preset, args.model, device)
    seed_everything(args.seed)
    trainer = make_trainer(preset, model=args.model, device=str(device), out_dir=args.out,
                           progress=not args.no_progress)
    if args.resume is not None:
        trainer.load_checkpoint(args.resume)
        print(f"resumed from {args.resume} at epoch {trainer.epoch}, step {trainer.step}", file=sys.stderr)
    trainer.fit()
    if trainer.epoch_log:
        print(json.dumps(trainer.epoch_log[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
