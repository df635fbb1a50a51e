"""Time and peak memory of the multi-scale deformable attention core.

Compares the library's ``multi_scale_deformable_attention`` (corner gather with
``embedding_bag`` forward, ``grid_sample``-backward splatting for the value
gradient) with the straightforward per-level ``grid_sample`` formulation (the
official pure-PyTorch path), forward only and forward + backward, on Deformable
DETR's shapes: batch 8, levels 32×32, 16×16, 8×8, 4×4, 8 heads, 4 points,
d_model 256 (32 per head), 300 queries.

Time: the two variants run alternately, ``--repeats`` times each after a warm-up,
so a busy machine slows both alike; we print the median and the fastest run and
the ratio of medians (library / grid_sample). On a machine whose cores are busy
with other work, multi-threaded timings of the library (many mid-sized
elementwise ops, each waiting for every thread) suffer far more than those of
the grid_sample version (fewer, larger ops); there, compare with ``--threads 1``.

Peak memory: each (variant, pass) runs once more under ``torch.profiler`` with
``profile_memory=True`` (:func:`detr_tutorial.profiling.peak_memory_mib`), which
records every allocation and free of PyTorch's allocator; the maximum of their
running sum is the extra memory the pass needed at its peak (inputs excluded,
outputs and gradients included). It works on any operating system.

Usage: ``python benchmarks/bench_ms_deform_attn.py [--threads 2] [--repeats 15]``
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from detr_tutorial.ops import (multi_scale_deformable_attention,
                               multi_scale_deformable_attention_grid_sample)
from detr_tutorial.profiling import peak_memory_mib

VARIANTS = {"library": multi_scale_deformable_attention,
            "grid_sample": multi_scale_deformable_attention_grid_sample}
SHAPES = [(32, 32), (16, 16), (8, 8), (4, 4)]
BATCH, HEADS, POINTS, HEAD_DIM, QUERIES = 8, 8, 4, 32, 300


def make_inputs(batch: int = BATCH, queries: int = QUERIES) -> tuple[torch.Tensor, ...]:
    """Random inputs; about 1 point in 6 falls partly or fully outside the map."""
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(SHAPES)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(batch, s, HEADS, HEAD_DIM, generator=g)
    loc = torch.rand(batch, queries, HEADS, len(SHAPES), POINTS, 2, generator=g) * 1.2 - 0.1
    attn = torch.rand(batch, queries, HEADS, len(SHAPES), POINTS, generator=g).softmax(-1)
    grad = torch.randn(batch, queries, HEADS * HEAD_DIM, generator=g)
    return value, shapes, loc, attn, grad


def run_once(fn, inputs, backward: bool) -> None:
    value, shapes, loc, attn, grad = inputs
    if backward:
        value, loc, attn = (t.detach().requires_grad_() for t in (value, loc, attn))
        fn(value, shapes, loc, attn).backward(grad)
    else:
        with torch.no_grad():
            fn(value, shapes, loc, attn)


def time_ms(repeats: int, backward: bool) -> dict[str, list[float]]:
    inputs = make_inputs()
    times = {name: [] for name in VARIANTS}
    for fn in VARIANTS.values():
        run_once(fn, inputs, backward)
    for _ in range(repeats):
        for name, fn in VARIANTS.items():
            start = time.perf_counter()
            run_once(fn, inputs, backward)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} alternating repeats")
    print(f"batch {BATCH}, levels {SHAPES}, {HEADS} heads, {POINTS} points, "
          f"d {HEADS * HEAD_DIM}, {QUERIES} queries\n")
    print(f"{'pass':<18}{'variant':<13}{'median ms':>10}{'min ms':>9}{'peak MiB':>10}")
    for backward, label in ((False, "forward"), (True, "forward+backward")):
        times = time_ms(args.repeats, backward)
        inputs = make_inputs()
        peaks = {name: peak_memory_mib(lambda fn=fn: run_once(fn, inputs, backward))
                 for name, fn in VARIANTS.items()}
        for name in VARIANTS:
            print(f"{label:<18}{name:<13}{statistics.median(times[name]):>10.1f}"
                  f"{min(times[name]):>9.1f}{peaks[name]:>10.1f}")
        t_ratio = statistics.median(times["library"]) / statistics.median(times["grid_sample"])
        m_ratio = peaks["library"] / peaks["grid_sample"]
        print(f"{label:<18}{'ratio':<13}{t_ratio:>10.2f}{'':>9}{m_ratio:>10.2f}"
              "   (library / grid_sample)\n")


if __name__ == "__main__":
    main()
