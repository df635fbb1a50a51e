"""Loading official DETR checkpoints into the library's model.

The library's DETR uses the official parameter names, so an official state
dict loads as it is. ``load_official_detr`` adds what ``load_state_dict``
leaves to the reader: it accepts the whole checkpoint (``{"model": ...,
"optimizer": ..., ...}``) and explains a mismatch -- which keys are missing or
unexpected, which shapes differ and, for the class head, what to change. It
also takes the path of the file and loads it with ``weights_only=True``.
Everything is checked before anything is loaded: on an error the model is
left as it was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import Tensor, nn

from .run_dir import read_weights

__all__ = ["load_official_detr", "check_state_dict", "CheckpointMismatchError"]


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


def load_official_detr(model: nn.Module, state_dict: Mapping | str | Path) -> nn.Module:
    """Load an official DETR state dict (or a checkpoint with a "model" entry) into ``model``.

    Args:
        model: a ``DETR`` from ``build_detr`` whose configuration matches the checkpoint.
        state_dict: the path of ``detr-r50-e632da11.pth`` (loaded with
            ``weights_only=True``), the dict ``torch.load`` returns for it, or its ``["model"]`` entry.

    Returns:
        ``model``, with every parameter and buffer replaced.

    Raises:
        CheckpointMismatchError: listing missing keys, unexpected keys and
            shape mismatches and values that are not tensors (nothing is loaded then).
        CheckpointError: the file cannot be read (truncated, or not a weights-only file).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(state_dict, (str, Path)):
        state_dict = read_weights(state_dict)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model


def check_state_dict(model: nn.Module, state_dict: Mapping) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``model.load_state_dict(state_dict)`` would load every
    entry: same keys, every value a tensor of the model's shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    not_tensor = sorted(k for k in set(own) & set(state_dict) if not isinstance(state_dict[k], Tensor))
    wrong_shape = sorted(k for k in set(own) & set(state_dict)
                         if isinstance(state_dict[k], Tensor) and state_dict[k].shape != own[k].shape)
    if missing or unexpected or not_tensor or wrong_shape:
        raise CheckpointMismatchError(_explain(missing, unexpected, not_tensor, wrong_shape, own, state_dict))


def _explain(missing: list[str], unexpected: list[str], not_tensor: list[str], wrong_shape: list[str],
             own: Mapping, theirs: Mapping) -> str:
    lines = ["the checkpoint does not fit the model:"]
    for k in not_tensor:
        lines.append(f"  {k}: checkpoint holds a {type(theirs[k]).__name__}, expected a tensor of shape "
                     f"{tuple(own[k].shape)}")
    if missing:
        lines.append(f"  {len(missing)} missing key(s): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {', '.join(unexpected)}")
    for k in wrong_shape:
        lines.append(f"  {k}: checkpoint {tuple(theirs[k].shape)}, model {tuple(own[k].shape)}")
    if "class_embed.weight" in wrong_shape:
        rows = theirs["class_embed.weight"].shape[0]
        lines.append(f"  the class head differs: build the model with num_classes={rows - 1} to load it "
                     f"as it is, or delete the class_embed.* entries from the state dict and load the "
                     f"rest with model.load_state_dict(..., strict=False) to fine-tune on your classes")
    if "query_embed.weight" in wrong_shape:
        lines.append(f"  build the model with num_queries={theirs['query_embed.weight'].shape[0]}")
    if any(k.startswith("backbone.0.") for k in missing + unexpected + wrong_shape):
        lines.append("  the backbone differs: check that backbone= ('resnet18', 'resnet34', 'resnet50', "
                     "'resnet101') and dilation= match the checkpoint")
    if any(".encoder.norm." in k for k in missing + unexpected):
        lines.append("  an encoder norm only exists with pre_norm=True: check pre_norm=")
    return "\n".join(lines)
