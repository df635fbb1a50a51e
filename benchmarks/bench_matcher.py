"""Time of the library's Hungarian matcher against the official DETR one.

    DETR_REPO=/path/to/detr python benchmarks/bench_matcher.py
    DETR_REPO=/path/to/detr python benchmarks/bench_matcher.py --batch 32 --repeats 15 --threads 1

``DETR_REPO`` is a clone of facebookresearch/detr (a work tree, or a bare
clone whose HEAD is read with ``git show``); without it the script prints
why and exits. The official ``models/matcher.py`` and ``util/box_ops.py``
are executed from there as modules; nothing of them is stored here.

The default case is DETR's COCO setting: batch 32, 100 queries, 91 classes
(92 logits with "no object"), 1 to 20 objects per image (seeded). Both
matchers run alternately, ``--repeats`` times each after a warm-up, so a
busy machine slows both alike; the script checks that they return the same
assignments and prints each one's median, its fastest run, and the ratio of
the medians (library / official). The library's call includes validating
its arguments; the official one validates nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from detr_tutorial.matcher import HungarianMatcher


def official_source(repo: Path, path: str) -> str:
    """``path`` of the official repository: from the work tree, else from the git HEAD."""
    if (repo / path).is_file():
        return (repo / path).read_text()
    return subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{path}"], check=True,
                          capture_output=True, text=True).stdout


def load_official_matcher(repo: Path) -> type:
    """The official ``HungarianMatcher`` class, its ``util.box_ops`` import served from the same clone."""
    box_ops = types.ModuleType("util.box_ops")
    exec(compile(official_source(repo, "util/box_ops.py"), "util/box_ops.py", "exec"), box_ops.__dict__)
    util = types.ModuleType("util")
    util.box_ops = box_ops
    saved = {name: sys.modules.get(name) for name in ("util", "util.box_ops")}
    sys.modules.update({"util": util, "util.box_ops": box_ops})
    try:
        matcher = types.ModuleType("official_matcher")
        exec(compile(official_source(repo, "models/matcher.py"), "models/matcher.py", "exec"), matcher.__dict__)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module
    return matcher.HungarianMatcher


def make_case(batch: int, queries: int, classes: int, max_objects: int, seed: int = 0) -> tuple[dict, list]:
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(batch, queries, classes + 1, generator=g),
               "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.25}
    targets = []
    for n in torch.randint(1, max_objects + 1, (batch,), generator=g).tolist():
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, classes, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return outputs, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=91)
    parser.add_argument("--max-objects", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per matcher (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    repo = os.environ.get("DETR_REPO")
    if not repo or not Path(repo).exists():
        print("skipped: set DETR_REPO to a clone of https://github.com/facebookresearch/detr "
              f"(got {repo!r})")
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    costs = dict(cost_class=1, cost_bbox=5, cost_giou=2)
    official = load_official_matcher(Path(repo))(**costs)
    library = HungarianMatcher(num_classes=args.classes, **costs)
    outputs, targets = make_case(args.batch, args.queries, args.classes, args.max_objects)
    expected, got = official(outputs, targets), library(outputs, targets)
    same = all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(expected, got))
    if not same:
        raise SystemExit("the library's assignments differ from the official ones")

    times: dict[str, list[float]] = {"official": [], "library": []}
    for _ in range(args.repeats):
        for name, matcher in (("official", official), ("library", library)):
            start = time.perf_counter()
            matcher(outputs, targets)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    n_objects = sum(len(t["labels"]) for t in targets)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; batch {args.batch}, "
          f"{args.queries} queries, {args.classes} classes, {n_objects} objects; same assignments: {same}")
    for name, t in times.items():
        print(f"{name:>9}: median {medians[name] * 1e3:8.2f} ms   fastest {min(t) * 1e3:8.2f} ms")
    print(f"ratio of medians (library / official): {medians['library'] / medians['official']:.2f}")


if __name__ == "__main__":
    main()
