"""Peak memory of a call, measured by PyTorch's own profiler, on any operating system.

PyTorch's CPU tensors come from its allocator, not from Python's, so ``tracemalloc``
does not see them. ``torch.profiler`` with ``profile_memory=True`` records every
allocation and every free of the allocator, with its size and time; the running
sum of those sizes is the memory the call holds, and its maximum is the peak.
"""
from __future__ import annotations

import os
from typing import Callable

from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_memory_mib"]


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Extra CPU memory (MiB) that PyTorch's allocator held at the peak of ``fn()``.

    Memory allocated before the call (inputs) is not counted; everything ``fn``
    allocates counts while it is alive, its result and gradients included. Blocks
    allocated outside PyTorch's allocator (NumPy arrays, scratch space inside some
    libraries) are not seen.

    Args:
        fn: called once, without arguments; its result is dropped.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the profiler's start/stop log off stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    held = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20
