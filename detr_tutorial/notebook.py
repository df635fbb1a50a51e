"""One-call set-up that every chapter runs first, so stored outputs reproduce.

``setup()`` seeds Python, NumPy and PyTorch, asks PyTorch for deterministic
algorithms, fixes the number of CPU threads (float sums depend on how work is
split between threads), sets short print options and a plain matplotlib style
with a dpi of 100, at which 8-pt labels stay legible in the HTML book (PNG only: SVG figures carry random ids that would change on
every run).
"""
from __future__ import annotations

import random

import inspect
from typing import Any

import numpy as np
import torch

__all__ = ["setup", "seed_everything", "show_source"]


def seed_everything(seed: int = 0) -> None:
    """Seed ``random``, NumPy and PyTorch with ``seed``."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int = 0, threads: int = 2, dpi: int = 100) -> None:
    """Make a chapter deterministic: seeds, threads, print options, plot style.

    Args:
        seed: seed for ``random``, NumPy and PyTorch.
        threads: intra-op threads for PyTorch (the book's budgets assume 2 cores).
        dpi: figure resolution of stored PNGs; 100 keeps 8-pt labels legible and notebooks under 1 MB.
    """
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    seed_everything(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.set_printoptions(precision=4, sci_mode=False, linewidth=100)
    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    _setup_matplotlib(dpi)


def _setup_matplotlib(dpi: int) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    plt.style.use("default")
    matplotlib.rcParams.update({
        "figure.dpi": dpi,
        "savefig.dpi": dpi,
        "figure.figsize": (6.0, 4.0),
        "font.size": 10,
        "axes.grid": False,
        "image.cmap": "viridis",
        "svg.hashsalt": "detr_tutorial",
    })
    try:  # inside IPython/Jupyter: PNG figures only
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a book dependency
        return
    ip = get_ipython()
    if ip is not None and hasattr(ip, "run_line_magic"):
        ip.run_line_magic("matplotlib", "inline")
        ip.run_line_magic("config", "InlineBackend.figure_formats = ['png']")
        ip.run_line_magic("config", "InlineBackend.rc = {'figure.dpi': %d}" % dpi)


def show_source(obj: Any):
    """Display the library's own source of ``obj`` (function, class or module),
    syntax-highlighted in Jupyter and in the HTML book.

    Chapters call this instead of pasting code, so what the reader sees is what
    runs; nbval re-checks it, so a stored chapter goes stale when the library
    changes.
    """
    from IPython.display import Code

    try:
        src = inspect.getsource(obj)
    except (TypeError, OSError) as exc:
        raise TypeError(f"show_source needs a function, class or module defined in Python, got {obj!r}") from exc
    return Code(inspect.cleandoc(src) if src.startswith((" ", "\t")) else src, language="python")
