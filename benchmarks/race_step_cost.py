"""CPU seconds per training step of every model of the race, at the race's two settings (chapter 24).

    nice -n 10 python benchmarks/race_step_cost.py --out book/race_runs/step_cost.json

Builds the seven variants of the ``race`` preset (the six models of the race, and ``dino_no_dn``: DINO with
``dn_number`` 0, which makes no denoising queries, as the official ``--use_dn`` off) at 64 px and at 128 px with
small objects (``--object-size 0.05 0.15``), and times full training steps (forward, loss, backward, clipping,
optimiser, scheduler) on the same batches for every model. The steps are taken round-robin, each round starting
at the next model, after untimed warm-up steps, so that a change of the machine's load hits every model alike.
Each step is timed twice: with ``time.process_time`` (this process's CPU seconds) and ``time.perf_counter``
(wall seconds). Writes the medians and every timed step to a JSON file, with the exact command, the torch
version, the date and the load average before and after.

Why CPU time: the race's recorded runs measured wall time while other work shared the machine, at loads that
differed from run to run, so their ``train_seconds`` do not compare. With one thread and no input/output during a
step, a process's CPU time counts only the time it computed, not the time the scheduler gave to others, so it
approximates the wall time of a quiet machine. What the run in ``book/race_runs/step_cost.json`` measured, on a
two-core virtual machine shared with two single-thread trainings and other jobs (load average 4.5 at the start,
5.3 at the end): the median wall time per step was 2.1 to 2.8 times the CPU time at 64 px and 1.5 to 1.6 times at
128 px, while the fastest wall-clock step of each model at 64 px, one the scheduler did not interrupt, was within
5% of the model's median CPU time (DETR: 0.204 s against 0.213 s). CPU time is not free of the load, though:
other processes compete for shared caches and memory bandwidth, and a two-round trial (``--rounds 2 --warmup 1``)
a few minutes earlier, at a load average of 3.3 to 4.4, gave CPU times 11 to 30% lower at 64 px (DETR 0.176 s per
step) and within 15% either way at 128 px. The absolute numbers are therefore good to about a quarter, more likely
too high than too low; the ratios between models, timed in turn on the same batches, are the sturdier result.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from detr_tutorial.engine import Trainer
from detr_tutorial.notebook import seed_everything
from detr_tutorial.presets import get_preset, make_trainer

#: setting name (as in ``book/race_runs/<model>_<setting>``) -> the ``DataConfig`` fields its command sets.
SETTINGS = {"64": {"image_size": 64}, "128_small": {"image_size": 128, "object_size": (0.05, 0.15)}}
#: label -> (model name, builder arguments that replace the preset's).
VARIANTS = {**{name: (name, {}) for name in ("detr", "deformable_detr", "conditional_detr", "dab_detr", "dn_detr",
                                               "dino")},
            "dino_no_dn": ("dino", {"dn_number": 0})}


def build_trainers(data: dict, num_steps: int) -> dict[str, Trainer]:
    """One trainer per variant of :data:`VARIANTS` on the ``race`` preset with ``data``, each seeded as the CLI
    seeds, on a training set of ``num_steps`` batches."""
    base = get_preset("race", data=data)
    preset = get_preset("race", data={**data, "num_train": base.batch_size * num_steps, "num_val": 8})
    trainers = {}
    for label, (name, extra) in VARIANTS.items():
        seed_everything(0)
        models = {**preset.models, name: {**preset.models[name], **extra}}
        trainers[label] = make_trainer(dataclasses.replace(preset, models=models), model=name, progress=False)
    return trainers


def time_steps(trainers: dict[str, Trainer], warmup: int) -> dict[str, dict[str, list[float]]]:
    """Round-robin training steps on the first trainer's batches (the same for all); per variant the CPU and wall
    seconds of every step after the first ``warmup`` rounds."""
    batches = list(next(iter(trainers.values())).train_loader)
    labels = list(trainers)
    seconds = {label: {"cpu": [], "wall": []} for label in labels}
    for i, (images, mask, targets) in enumerate(batches):
        for label in labels[i % len(labels):] + labels[:i % len(labels)]:  # each round starts at the next model
            trainer = trainers[label]
            trainer.model.train()
            cpu, wall = time.process_time(), time.perf_counter()
            trainer.train_step(images, mask, targets)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if i >= warmup:  # the first steps allocate memory
                seconds[label]["cpu"].append(round(cpu, 4))
                seconds[label]["wall"].append(round(wall, 4))
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="timed steps per model and setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--out", type=Path, default=Path("book/race_runs/step_cost.json"))
    args = p.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        p.error(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")

    torch.set_num_threads(1)
    result = {"command": shlex.join(["python", "benchmarks/race_step_cost.py", *sys.argv[1:]]),
              "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "threads": torch.get_num_threads(), "warmup": args.warmup, "rounds": args.rounds,
              "load_average": {"start": [round(x, 2) for x in os.getloadavg()]}, "settings": {}}
    for setting, data in SETTINGS.items():
        trainers = build_trainers(data, args.warmup + args.rounds)
        seconds = time_steps(trainers, args.warmup)
        result["settings"][setting] = {
            "data": data, "batch_size": next(iter(trainers.values())).train_loader.batch_size,
            "models": {label: {"cpu_seconds_per_step": statistics.median(s["cpu"]),
                               "wall_seconds_per_step": statistics.median(s["wall"]), **s}
                       for label, s in seconds.items()}}
        print(f"{setting}: median CPU s/step (wall s/step)")
        for label, s in result["settings"][setting]["models"].items():
            print(f"  {label:16s} {s['cpu_seconds_per_step']:.3f} ({s['wall_seconds_per_step']:.3f})")
    result["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
