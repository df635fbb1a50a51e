"""What denoising costs per training step: DN-DETR against DAB-DETR, DINO against DINO without denoising.

    python benchmarks/denoising_cost.py                       # the race preset at 64 px, 1 thread
    python benchmarks/denoising_cost.py --image-size 128 --steps 20

Builds the four models of the race preset (``dino_no_dn`` is DINO with ``dn_number`` 0, which makes no
denoising queries, as the official ``--use_dn`` off) and times full training steps (forward, loss, backward,
optimiser) on the same batches, taking the steps in turn so that a change in the machine's load hits all
four alike. Prints the median seconds per step of each and the ratio of each denoising model to its parent.
Its first run (race preset, 64 px, 1 thread, wall clock on a busy two-core machine) gave ratios of
1.79 (DN-DETR / DAB-DETR) and 1.47 (DINO / DINO without denoising); ``race_step_cost.py`` measures the same
pairs, and the other models, in CPU time.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from detr_tutorial.notebook import seed_everything
from detr_tutorial.presets import get_preset, make_trainer

#: (model with denoising, the same model without) as (label, model name, extra builder arguments).
PAIRS = ((("dn_detr", "dn_detr", {}), ("dab_detr", "dab_detr", {})),
         (("dino", "dino", {}), ("dino_no_dn", "dino", {"dn_number": 0})))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="race")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 untimed ones)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")

    torch.set_num_threads(args.threads)
    base = get_preset(args.preset, data={"image_size": args.image_size})
    preset = get_preset(args.preset, data={"image_size": args.image_size,
                                           "num_train": base.batch_size * (args.steps + 2), "num_val": 8})
    trainers = {}
    for label, name, extra in (entry for pair in PAIRS for entry in pair):
        seed_everything(0)
        models = {**preset.models, name: {**preset.models[name], **extra}}
        trainers[label] = make_trainer(dataclasses.replace(preset, models=models), model=name, progress=False)
    batches = list(next(iter(trainers.values())).train_loader)  # the same batches for every model
    seconds: dict[str, list[float]] = {label: [] for label in trainers}
    for i, (images, mask, targets) in enumerate(batches):
        for label, trainer in trainers.items():
            trainer.model.train()
            start = time.perf_counter()
            trainer.train_step(images, mask, targets)
            if i >= 2:  # the first steps allocate memory
                seconds[label].append(time.perf_counter() - start)

    print(f"{args.preset} preset, {args.image_size} px, batch {preset.batch_size}, {args.threads} thread(s), "
          f"median of {args.steps} steps:")
    for (dn_label, *_), (plain_label, *_) in PAIRS:
        dn, plain = statistics.median(seconds[dn_label]), statistics.median(seconds[plain_label])
        print(f"  {dn_label:8s} {dn:.3f} s/step   {plain_label:10s} {plain:.3f} s/step   ratio {dn / plain:.2f}")


if __name__ == "__main__":
    main()
