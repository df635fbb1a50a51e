"""Reporting a diverging training run at the step where it diverges.

:class:`detr_tutorial.engine.Trainer` checks three things before each
optimiser step, so that the parameters stay as they were when it stops:

* the model's outputs: a NaN box would otherwise stop the matcher with a
  ``ValueError`` about boxes that says nothing of training. A forward pass that
  itself stops on non-finite values (the library's checks raise a
  ``ValueError`` whose message says "finite", e.g. deformable attention when
  activations overflow) is reported the same way;
* the loss;
* the gradient norm: a finite loss can have a NaN gradient, which one
  optimiser step would spread into every parameter.

Each raises :class:`NonFiniteLossError` naming the step, the epoch, the loss
terms (the last finite loss when there are none) and the largest parameter.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["NonFiniteLossError", "diverged", "non_finite_outputs"]


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the outputs, the loss or the gradient became NaN or infinite.

    The message names the step, the epoch and the loss terms (the last finite
    ones when the outputs are already non-finite)."""


def non_finite_outputs(outputs: Any) -> list[str]:
    """Names of the tensors in a (nested) outputs dict or list that hold NaN or inf, with how many values.

    One device synchronisation when every value is finite (the usual case)."""
    named = [(n, t) for n, t in _named_tensors(outputs, "") if t.is_floating_point()]
    if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return []
    counts = [(n, t.numel(), int((~torch.isfinite(t)).sum())) for n, t in named]
    return [f"{n} ({bad} of {total} values)" for n, total, bad in counts if bad]


def _named_tensors(outputs: Any, name: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(outputs, Tensor):
        yield name or "output", outputs
    elif isinstance(outputs, Mapping):
        for k, v in outputs.items():
            yield from _named_tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(outputs, (list, tuple)):
        for i, v in enumerate(outputs):
            yield from _named_tensors(v, f"{name}[{i}]")


def diverged(what: str, step: int, epoch: int, model: nn.Module, loss_dict: Optional[Mapping[str, Tensor]],
             step_log: Sequence[dict]) -> NonFiniteLossError:
    """The error for ``what`` went wrong at ``step``: with the loss terms, or the last finite loss of ``step_log``."""
    if loss_dict is not None:
        terms = "loss terms: " + ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items())
    elif step_log:
        terms = f"the last finite loss: {step_log[-1]['loss']:.4g} at step {step_log[-1]['step']}"
    else:
        terms = "no finite step before"
    size, name = max((p.detach().abs().max().item(), n) for n, p in model.named_parameters())
    return NonFiniteLossError(f"{what} at step {step} (epoch {epoch}); {terms}; largest |parameter| {size:.3g} "
                              f"({name}); lower the learning rate or clip gradients")
