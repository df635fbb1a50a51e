"""Forward and forward+backward time of DETR configurations.

    python benchmarks/bench_detr.py --repeats 3
    python benchmarks/bench_detr.py --configs small-64 --threads 2

Prints, per configuration, the median over ``--repeats`` runs (after one
warm-up run) of an eval-mode forward under ``torch.no_grad`` and of a
train-mode forward + backward of a simple scalar loss.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from detr_tutorial.models import build_detr

CONFIGS = {
    # name: (build_detr kwargs, batch, height, width)
    "r50-800x1066": (dict(), 1, 800, 1066),
    "small-64-d128": (dict(backbone="small", num_classes=3, hidden_dim=128, nheads=8, enc_layers=3,
                           dec_layers=3, dim_feedforward=512, num_queries=20), 32, 64, 64),
    "small-64-d64": (dict(backbone="small", num_classes=3, hidden_dim=64, nheads=4, enc_layers=2,
                          dec_layers=2, dim_feedforward=256, num_queries=10), 32, 64, 64),
}


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, repeats: int, device: torch.device) -> None:
    kwargs, batch, h, w = CONFIGS[name]
    torch.manual_seed(0)
    model = build_detr(**kwargs).to(device)
    images = torch.rand(batch, 3, h, w, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            model.eval()(images)
        sync()

    def forward_backward():
        out = model.train()(images)
        loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_boxes"].sum()
        loss = loss + sum(a["pred_boxes"].sum() for a in out.get("aux_outputs", []))
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()

    params = sum(p.numel() for p in model.parameters())
    fwd = time_it(forward, repeats)
    fwd_bwd = time_it(forward_backward, repeats)
    print(f"{name:>16}  batch {batch:>3} {h}x{w}  params {params:>11,}  "
          f"forward {fwd * 1e3:9.1f} ms  forward+backward {fwd_bwd * 1e3:9.1f} ms  "
          f"ratio {fwd_bwd / fwd:4.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for name in args.configs:
        bench(name, args.repeats, device)


if __name__ == "__main__":
    main()
