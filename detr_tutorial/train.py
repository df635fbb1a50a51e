"""Command line training: ``python -m detr_tutorial.train --model detr --preset shapes_cpu --out runs/x``.

Trains a registered model (:data:`detr_tutorial.presets.MODELS`) with a named
preset (:data:`detr_tutorial.presets.PRESETS`) using the book's engine. The
output folder receives ``checkpoint.pth`` (after every epoch) and
``metrics.jsonl`` (one JSON record per epoch: mean losses, step, training
seconds and, when evaluated, the COCO metrics on the held-out split) and
``commands.jsonl`` (one record per invocation: the exact command line, the
resolved preset, threads, library versions, the code version and, once the
run ends, its status), so that a recorded result can always be traced to the
command and the code that produced it. ``--resume`` continues from a
checkpoint, taking exactly the steps the uninterrupted run would have taken;
it refuses settings that contradict the checkpoint's. A folder that holds a
run is never overwritten unless ``--overwrite`` says so.

Under ``torchrun --nproc_per_node N -m detr_tutorial.train ...`` the same command
trains with DistributedDataParallel; the preset's batch size is the global batch
(split over the processes) and the learning rate stays the preset's, and only
rank 0 writes the output folder (see :mod:`detr_tutorial.distributed`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import distributed
from .notebook import seed_everything
from .data.coco_loaders import CocoConfig
from .presets import MODELS, PRESETS, Preset, describe_run, get_coco_preset, get_preset, make_trainer
from .run_dir import (CHECKPOINT, COMMANDS, METRICS, CheckpointError, code_version, existing_run_files, read_jsonl,
                      read_training_checkpoint, resume_conflicts, write_jsonl)

__all__ = ["main", "parse_args", "record_command", "finish_command", "resolve_device"]

#: the command-line argument behind each setting a checkpoint records (the rest come with ``--preset``).
FLAGS = {"model": "--model", "train.epochs": "--epochs", "data.image_size": "--image-size",
         "data.object_size": "--object-size"}
FLAGS |= {f"data.{split}_{kind}": f"--coco-{split}" for split in ("train", "val") for kind in ("images", "json")}
FLAGS |= {"data.num_classes": "--num-classes", "data.contiguous_ids": "--contiguous-ids"}


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
    """Append this invocation to ``out/commands.jsonl`` with ``"status": "running"``; return the record.

    :func:`finish_command` replaces the status when the run ends; a record
    still "running" belongs to a process that was killed."""
    launcher = ["python", "-m"]
    if distributed.launched_by_torchrun():
        world, per_node = distributed.world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size()))
        launcher = ["torchrun", f"--nnodes={world // per_node}", f"--nproc_per_node={per_node}", "-m"]
    record = {"command": shlex.join([*launcher, "detr_tutorial.train", *argv]), "model": model,
              "world_size": distributed.world_size(),
              "preset": dataclasses.asdict(preset), "device": str(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "code": code_version(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "status": "running"}
    path = Path(out) / COMMANDS
    write_jsonl(path, (read_jsonl(path) if path.exists() else []) + [record])
    return record


def finish_command(out: str | Path, status: str, error: Optional[BaseException] = None) -> dict:
    """Set the status of the last record of ``out/commands.jsonl``: "finished", "stopped" (``--max-seconds``),
    "interrupted" (Ctrl-C) or "failed" (with the error); return the record."""
    path = Path(out) / COMMANDS
    records = read_jsonl(path)
    records[-1].update(status=status, ended=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if error is not None:
        records[-1]["error"] = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    write_jsonl(path, records)
    return records[-1]


def _positive(kind: type, allow_zero: bool = False):
    def parse(text: str):
        value = kind(text)
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if allow_zero else '> 0'}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detr_tutorial.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="detr", choices=sorted(MODELS), help="architecture (default: detr)")
    p.add_argument("--preset", default="shapes_cpu", choices=sorted(PRESETS), help="data + optimisation settings")
    p.add_argument("--epochs", type=_positive(int), default=None, help="total epochs (default: the preset's)")
    p.add_argument("--eval-every", type=_positive(int, allow_zero=True), default=None,
                   help="evaluate every K epochs (0: only at the end)")
    p.add_argument("--image-size", type=_positive(int), default=None,
                   help="side of the synthetic images in pixels (default: the preset's); objects scale with it")
    p.add_argument("--object-size", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="side of the shapes as fractions of the image side (default: the preset's)")
    p.add_argument("--max-seconds", type=_positive(float), default=None,
                   help="stop this invocation after this much training time (a resumed run gets its own budget)")
    p.add_argument("--out", required=True, help="output folder for checkpoint.pth and metrics.jsonl")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run files that --out already holds and start over")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when available)")
    p.add_argument("--seed", type=_positive(int, allow_zero=True), default=0, help="seed of initialisation and shuffling")
    p.add_argument("--threads", type=_positive(int), default=None, help="CPU threads for PyTorch (default: PyTorch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    coco = p.add_argument_group("your own data (COCO format), instead of the preset's shapes",
                                "--image-size is then the shorter side at validation and the largest training "
                                "scale (the official 800 scaled down; default: the preset's image size)")
    coco.add_argument("--coco-train", nargs=2, metavar=("IMAGES", "JSON"), help="training image folder and json")
    coco.add_argument("--coco-val", nargs=2, metavar=("IMAGES", "JSON"), help="validation image folder and json")
    coco.add_argument("--num-classes", type=_positive(int), default=None,
                      help="classes without no-object (default: the largest category id + 1)")
    coco.add_argument("--contiguous-ids", action="store_true", help="relabel the category ids 0..K-1")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)


def _check_out(args: argparse.Namespace) -> Optional[str]:
    """Why ``--out`` may not be written with these arguments (None: it may)."""
    out, own = Path(args.out), Path(args.out) / CHECKPOINT
    run = [name for name in (CHECKPOINT, METRICS) if (out / name).exists()]
    if args.overwrite and args.resume is not None and _same_file(args.resume, own):
        return f"--overwrite would delete {own}, the checkpoint that --resume continues from"
    if not run or args.overwrite or (args.resume is not None and _same_file(args.resume, own)):
        return None
    if args.resume is None:
        return (f"--out {out} already holds a run ({', '.join(run)}); add --resume {own} to continue it, "
                f"or --overwrite to delete its files and start over")
    return f"--out {out} holds another run than the one --resume {args.resume} continues; choose another --out"


def _explain(args: argparse.Namespace, conflicts: list) -> str:
    lines = [f"--resume {args.resume} contradicts this command:"]
    for name, ours, theirs in conflicts:
        where = FLAGS.get(name, f"--preset {args.preset}")
        lines.append(f"  {name}: {ours!r} from {where}, but {theirs!r} in the checkpoint")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.object_size is not None and not 0 < args.object_size[0] <= args.object_size[1] <= 1:
        parser.error(f"--object-size needs 0 < MIN <= MAX <= 1, got {args.object_size}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    overrides = {k: v for k, v in (("epochs", args.epochs), ("eval_every", args.eval_every),
                                   ("max_seconds", args.max_seconds)) if v is not None}
    data = {k: v for k, v in (("image_size", args.image_size),
                              ("object_size", None if args.object_size is None else tuple(args.object_size)))
            if v is not None}
    if args.coco_train or args.coco_val or args.num_classes or args.contiguous_ids:
        preset = _coco_preset(parser, args, overrides)
    else:
        preset = get_preset(args.preset, data=data, **overrides)
    try:
        distributed.check_batch_split(preset.batch_size, distributed.world_size())
    except ValueError as error:
        parser.error(f"--preset {args.preset}: {error}")
    refusal, checkpoint = _check_out(args), None
    if refusal is not None:
        parser.error(refusal)
    if args.resume is not None:
        try:
            checkpoint = read_training_checkpoint(args.resume)
        except (CheckpointError, FileNotFoundError) as error:
            parser.error(f"--resume: {error}")
        conflicts = resume_conflicts(checkpoint, dataclasses.asdict(preset.train), describe_run(preset, args.model),
                                     None)
        if conflicts:
            parser.error(_explain(args, conflicts))
    if distributed.launched_by_torchrun():
        device = distributed.init_from_env(device)
    main_process = distributed.is_main_process()  # rank 0 alone writes the output folder
    if args.overwrite and main_process:
        for name in existing_run_files(args.out):
            (Path(args.out) / name).unlink()
            print(f"--overwrite: deleted {Path(args.out) / name}", file=sys.stderr)
    if main_process:
        record_command(args.out, argv, preset, args.model, device)
    try:
        trainer = _train(args, preset, device, checkpoint)
    except BaseException as error:  # recorded, then raised as it is
        if main_process:
            finish_command(args.out, "interrupted" if isinstance(error, KeyboardInterrupt) else "failed", error)
        raise
    finally:
        distributed.cleanup()
    if main_process:
        finish_command(args.out, "finished" if trainer.epoch == preset.train.epochs else "stopped")
    if trainer.epoch_log and main_process:
        print(json.dumps(trainer.epoch_log[-1]))
    return 0


def _coco_preset(parser: argparse.ArgumentParser, args: argparse.Namespace, overrides: dict) -> Preset:
    """The preset's model and optimisation on the COCO folders of ``--coco-train`` and ``--coco-val``."""
    if not (args.coco_train and args.coco_val):
        parser.error("your own data needs both --coco-train IMAGES JSON and --coco-val IMAGES JSON")
    if args.object_size is not None:
        parser.error("--object-size sets the synthetic shapes; it does not apply to --coco-train data")
    image_size = args.image_size or get_preset(args.preset).data.image_size
    try:
        data = CocoConfig(*args.coco_train, *args.coco_val, image_size=image_size, num_classes=args.num_classes,
                          contiguous_ids=args.contiguous_ids)
    except ValueError as error:
        parser.error(str(error))
    return get_coco_preset(args.preset, data, **overrides)


def _train(args: argparse.Namespace, preset: Preset, device: torch.device, checkpoint: Optional[dict]):
    seed_everything(args.seed)
    trainer = make_trainer(preset, model=args.model, device=str(device), out_dir=args.out,
                           progress=not args.no_progress)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint, source=args.resume)
        trainer.continues = Path(args.resume)
        print(f"resumed from {args.resume} at epoch {trainer.epoch}, step {trainer.step}", file=sys.stderr)
        if trainer.epoch == preset.train.epochs:
            print(f"the checkpoint has trained all {trainer.epoch} epochs: nothing to train (raise --epochs to "
                  f"continue)", file=sys.stderr)
    if distributed.is_distributed():
        distributed.distribute(trainer)
    trainer.fit()
    if trainer.epoch < preset.train.epochs:
        print(f"stopped by --max-seconds {args.max_seconds} after epoch {trainer.epoch - 1} (step {trainer.step}); "
              f"--resume {Path(args.out) / CHECKPOINT} continues", file=sys.stderr)
    return trainer


if __name__ == "__main__":
    sys.exit(main())
