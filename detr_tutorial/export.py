"""Export a detector for deployment: ``torch.export`` and ONNX.

``export_program(model, images)`` traces the model in eval mode into a
``torch.export.ExportedProgram``; ``export_onnx(model, images, path)`` writes an ONNX file
(``torch.onnx.export(..., dynamo=True)``) that onnxruntime runs. Both export
:class:`Detections`, the model reduced to its two deployment outputs ``pred_logits`` and
``pred_boxes`` (auxiliary outputs and figure-only references are dropped).

The graph has the shapes of the example: batch, height and width are fixed (pad or resize
images to that size and pass the padding mask); for DETR, ``dynamic=True`` (``--dynamic``) leaves
them free. Input checks that read tensor values (a mask
that hides a whole image, for example) cannot be part of a traced graph; the models skip them
while ``torch.compiler.is_exporting()``, and :func:`check_example` runs them eagerly on the
example instead. The command reads every checkpoint ``python -m detr_tutorial.predict`` reads (a run
folder, an official ``.pth``, a ``transformers`` folder), through the same loader::

    python -m detr_tutorial.export --checkpoint facebook-detr-resnet-50/ --out detr.onnx --size 800 1066
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.export import Dim

from .models import DETR
from .models.backbone import check_images_and_mask
from .predict import load_predictor

__all__ = ["Detections", "check_example", "export_program", "export_onnx", "load_for_export", "main"]


class Detections(nn.Module):
    """``model`` with the outputs a deployment reads: ``(pred_logits (B, Q, K'), pred_boxes (B, Q, 4))``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        out = self.model(images, mask)
        return out["pred_logits"], out["pred_boxes"]


def check_example(model: nn.Module, images: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, ...]:
    """Validate the example batch eagerly (the checks an exported graph leaves out) and return the
    export's positional inputs: ``(images,)`` or ``(images, mask)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_images_and_mask(images, mask)
    with torch.no_grad():
        model.eval()(images, mask)  # raises on what the graph cannot check (e.g. a fully padded image)
    return (images,) if mask is None else (images, mask)


def _dynamic_shapes(args: tuple[Tensor, ...]) -> tuple[dict, ...]:
    """Batch, height and width left free (images from 64 to 4096 pixels a side)."""
    batch = Dim("batch", min=1, max=1024)
    height, width = Dim("height", min=64, max=4096), Dim("width", min=64, max=4096)
    return ({0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width})[:len(args)]


def export_program(model: nn.Module, images: Tensor, mask: Optional[Tensor] = None,
                   dynamic: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``Detections(model)`` in eval mode, for inputs shaped like ``images``
    (B, 3, H, W) and ``mask`` (B, H, W) bool, True on padding (None: the graph takes images only).
    ``dynamic=True`` (DETR only) leaves batch, height and width free instead of fixing the example's."""
    args = check_example(model, images, mask)
    if dynamic and not isinstance(model, DETR):
        raise ValueError(f"dynamic=True supports DETR only; export a {type(model).__name__} for a fixed size "
                         f"(its levels' sizes become constants of the graph)")
    if dynamic and images.shape[0] < 2:
        raise ValueError("dynamic=True needs an example batch of at least 2 images: torch.export fixes "
                         "a size of 1 as a constant")
    with torch.no_grad():
        return torch.export.export(Detections(model).eval(), args,
                                   dynamic_shapes=_dynamic_shapes(args) if dynamic else None)


def export_onnx(model: nn.Module, images: Tensor, path: str | Path, mask: Optional[Tensor] = None,
                dynamic: bool = False) -> Path:
    """Write ``Detections(model)`` in eval mode to the ONNX file ``path`` (inputs ``images`` and, when
    ``mask`` is given, ``mask``; outputs ``pred_logits`` and ``pred_boxes``; ``dynamic`` as in
    :func:`export_program`). Returns the path."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder for the ONNX file")
    program = export_program(model, images, mask, dynamic)
    names = ["images"] if mask is None else ["images", "mask"]
    onnx_program = torch.onnx.export(program, f=None, input_names=names,
                                     output_names=["pred_logits", "pred_boxes"], dynamo=True, verbose=False)
    onnx_program.save(str(path))
    return path


def load_for_export(checkpoint: str | Path) -> nn.Module:
    """The model of any checkpoint :func:`detr_tutorial.predict.load_predictor` reads (the same loader): a run
    folder or a trainer's ``checkpoint.pth``, an official DETR ``.pth`` (architecture read from its weights) or a
    ``transformers`` folder (config.json + model.safetensors), in eval mode on the CPU."""
    return load_predictor(checkpoint).model.eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m detr_tutorial.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="what predict reads: a run folder or its checkpoint.pth, an official DETR .pth, or a "
                             "transformers folder (config.json + model.safetensors)")
    parser.add_argument("--out", required=True, help="the ONNX file to write (.onnx)")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("HEIGHT", "WIDTH"),
                        help="the fixed input size of the exported graph (default 800 1066)")
    parser.add_argument("--batch", type=int, default=1, help="the fixed batch size (default 1)")
    parser.add_argument("--dynamic", action="store_true",
                        help="DETR only: leave batch, height and width free (--size and --batch, at least 2, "
                             "give the example)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1 or min(args.size) < 1:
        parser.error(f"--batch and --size must be positive, got {args.batch} and {list(args.size)}")
    try:
        model = load_for_export(args.checkpoint)
    except (ValueError, FileNotFoundError) as error:  # each names the file
        parser.error(f"--checkpoint: {error}")
    example = torch.zeros(max(args.batch, 2) if args.dynamic else args.batch, 3, *args.size)
    path = export_onnx(model, example, args.out, dynamic=args.dynamic)
    shape = "(B, 3, H, W)" if args.dynamic else str(tuple(example.shape))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): images {shape} -> pred_logits, pred_boxes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
