"""Wall time to a given AP: train a preset and print AP / AP50 after every evaluation.

    python benchmarks/bench_train_detr.py                      # the book's shapes_cpu preset
    python benchmarks/bench_train_detr.py --threads 2 --eval-every 1
    python benchmarks/bench_train_detr.py --model detr --preset tiny

Trains exactly what chapter 10 and ``python -m detr_tutorial.train`` train
(same preset, same seed), and prints one line per evaluation: epoch, step,
training seconds, wall seconds since the start (data generation and
evaluations included), AP and AP50 on the held-out split. The last lines give
the time per step and the first evaluation reaching AP50 >= 0.9 and AP >= 0.5.
"""
from __future__ import annotations

import argparse
import time

import torch

from detr_tutorial.notebook import seed_everything
from detr_tutorial.presets import MODELS, PRESETS, get_preset, make_trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="detr", choices=sorted(MODELS))
    p.add_argument("--preset", default="shapes_cpu", choices=sorted(PRESETS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--eval-every", type=int, default=None, help="default: the preset's")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)  # as the book's setup()
    overrides = {k: v for k, v in (("epochs", args.epochs), ("eval_every", args.eval_every)) if v is not None}
    preset = get_preset(args.preset, **overrides)
    start = time.perf_counter()
    reached = []

    def report(trainer, record):
        if "AP" not in record:
            return
        wall = time.perf_counter() - start
        print(f"epoch {record['epoch']:3d}  step {record['step']:5d}  train {record['train_seconds']:7.1f} s  "
              f"wall {wall:7.1f} s  AP {record['AP']:.3f}  AP50 {record['AP50']:.3f}", flush=True)
        if record["AP50"] >= 0.9 and record["AP"] >= 0.5:
            reached.append((record["step"], wall))

    seed_everything(args.seed)
    trainer = make_trainer(preset, model=args.model, progress=False, callbacks=[report])
    print(f"{args.model} / {args.preset}: {sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
          f"{len(trainer.train_loader)} steps per epoch, {args.threads} threads; data ready after "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    trainer.fit()
    print(f"total wall {time.perf_counter() - start:.1f} s; "
          f"{1000 * trainer.train_seconds / max(trainer.step, 1):.0f} ms per training step")
    if reached:
        print(f"first evaluation with AP50 >= 0.9 and AP >= 0.5: step {reached[0][0]}, wall {reached[0][1]:.1f} s")
    else:
        print("AP50 >= 0.9 and AP >= 0.5 not reached")


if __name__ == "__main__":
    main()
