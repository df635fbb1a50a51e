"""Predict on a photo: ``python -m detr_tutorial.predict --checkpoint PATH --image IMG [--out OUT.png]``.

Prints one line per detection with a score of at least ``--threshold`` (score, box ``x0 y0 x1 y1`` in pixels
of the photo, class name) and, with ``--out``, writes the photo with the boxes and labels drawn
(``torchvision.utils.draw_bounding_boxes``). ``--checkpoint`` is any checkpoint the library loads:

* a run folder of ``python -m detr_tutorial.train`` or its ``checkpoint.pth``: the checkpoint's ``run``
  records the model name and settings (the same record ``--resume`` checks), the data it saw (image size,
  normalisation) and, since COCO-folder training, the class names;
* an official DETR release (``detr-r50-e632da11.pth`` and its siblings, the whole file or its ``"model"``):
  ResNet depth, layer counts and sizes are read from the weights; images are normalised with ImageNet's
  mean and std and resized to the official 800 pixels (longer side at most 1333); 91 classes get COCO's
  names. A DC5 release (dilated last stage) has the same weights as its plain sibling: pass ``--dilation``;
* a Hugging Face ``transformers`` folder (``config.json`` + ``model.safetensors``, as ``save_pretrained`` writes
  it) of DETR, Deformable DETR, Conditional DETR or DAB-DETR, read by :func:`detr_tutorial.hub.load_hf_folder`:
  class names from the config's ``id2label``, the post-processing of the model's training recipe, images
  normalised with ImageNet's mean and std and resized as the folder's ``preprocessor_config.json`` says
  (``size.shortest_edge``/``longest_edge``; 800 and 1333, the DETR image processor's defaults, without one).

The photo is resized as the model's validation images were (shorter side to the training image size), the
boxes are given in the photo's own pixels.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from .checkpoints import check_state_dict, load_official_detr
from .data.coco_transforms import IMAGENET_MEAN, IMAGENET_STD, coco_transforms
from .data.shapes import CLASSES as SHAPES_CLASSES
from .hub import load_hf_folder
from .hub_rules import RECIPES as HF_RECIPES
from .models import build_detr
from .presets import MODELS
from .run_dir import CHECKPOINT, TRAINING_KEYS, CheckpointError, read_weights
from .train import resolve_device

__all__ = ["COCO_CLASSES", "Predictor", "load_predictor", "main", "read_image"]

#: COCO's category names by id, 0..90, "N/A" where no category uses the id (the official DETR demo's list).
COCO_CLASSES = (
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
#: ResNet depth from (bottleneck blocks?, blocks in layer3).
_RESNETS = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}


@dataclass
class Predictor:
    """A model in eval mode with what it needs to read a photo: post-processing, class names, input size."""

    model: nn.Module
    postprocess: Callable
    classes: tuple[str, ...]
    image_size: int
    max_size: Optional[int] = None
    normalize: bool = False

    @torch.no_grad()
    def __call__(self, image: Tensor, threshold: float = 0.7) -> dict[str, Tensor]:
        """uint8 image (3, H, W) -> ``scores`` (N,), ``labels`` (N,), ``boxes`` (N, 4) pixel xyxy of the image,
        the detections scoring at least ``threshold``, best first."""
        if not (isinstance(image, Tensor) and image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3):
            raise ValueError(f"image must be a uint8 (3, H, W) tensor, got "
                             f"{(image.dtype, tuple(image.shape)) if isinstance(image, Tensor) else type(image)}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        pixels = coco_transforms(False, self.image_size, self.max_size, self.normalize)(tv_tensors.Image(image))
        pixels = pixels.as_subclass(Tensor)
        pixels = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels
        device = next(self.model.parameters()).device
        mask = torch.zeros((1, *pixels.shape[-2:]), dtype=torch.bool, device=device)
        outputs = self.model(pixels[None].to(device), mask)
        result = self.postprocess(outputs, torch.tensor([image.shape[-2:]], device=device))[0]
        keep = result["scores"] >= threshold
        order = result["scores"][keep].argsort(descending=True)
        return {k: v[keep][order].cpu() for k, v in result.items()}


def read_image(path: str | Path) -> Tensor:
    """The photo at ``path`` as a uint8 RGB tensor (3, H, W); ``ValueError`` naming the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--image {path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        with Image.open(path) as image:
            return F.pil_to_tensor(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"--image {path} cannot be read as an image ({error})") from error


def _count(keys: Sequence[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _official_detr(weights: Mapping[str, Tensor], source: str, dilation: bool) -> Predictor:
    """An official DETR state dict -> a predictor; its architecture is read from the weights' names and shapes."""
    keys = list(weights)
    resnet = _RESNETS.get(("backbone.0.body.layer1.0.conv3.weight" in weights,
                           _count(keys, r"backbone\.0\.body\.layer3\.(\d+)\.")))
    if resnet is None:
        raise CheckpointError(f"{source}: the backbone's weights are not those of a ResNet-18/34/50/101")
    num_classes = weights["class_embed.weight"].shape[0] - 1
    queries, hidden = weights["query_embed.weight"].shape
    model = build_detr(resnet, num_classes=num_classes, hidden_dim=hidden, num_queries=queries, dilation=dilation,
                       enc_layers=_count(keys, r"transformer\.encoder\.layers\.(\d+)\."),
                       dec_layers=_count(keys, r"transformer\.decoder\.layers\.(\d+)\."),
                       dim_feedforward=weights["transformer.encoder.layers.0.linear1.weight"].shape[0],
                       pre_norm="transformer.encoder.norm.weight" in weights)
    load_official_detr(model, weights)
    classes = COCO_CLASSES if num_classes == len(COCO_CLASSES) else tuple(f"class {i}" for i in range(num_classes))
    _, _, postprocess = MODELS["detr"](num_classes)
    return Predictor(model.eval(), postprocess, classes, 800, 1333, normalize=True)


def _trained(state: Mapping, source: str, model_name: Optional[str]) -> Predictor:
    """A checkpoint of the library's trainer -> a predictor, rebuilt from its ``run`` record."""
    run = state.get("run")
    if not isinstance(run, Mapping) or run.get("model") not in MODELS:
        raise CheckpointError(f"{source} is a training checkpoint without a run record naming one of the models "
                              f"{sorted(MODELS)} (found {run!r:.200}); it cannot be rebuilt")
    if model_name is not None and model_name != run["model"]:
        raise ValueError(f"--model {model_name}: {source} holds a {run['model']} model, not a {model_name}")
    data = run.get("data", {})
    classes = state.get("classes") or (SHAPES_CLASSES if "num_train" in data else None)
    if classes is None:
        raise CheckpointError(f"{source} does not record its class names (a run from before they were saved)")
    model, _, postprocess = MODELS[run["model"]](len(classes), **run["model_kwargs"])
    check_state_dict(model, state["model"])  # every key and shape, with a hint for the class head
    model.load_state_dict(state["model"])
    return Predictor(model.eval(), postprocess, tuple(classes), int(data["image_size"]), data.get("max_size"),
                     bool(data.get("normalize", False)))


def _hub_sizes(folder: Path) -> tuple[int, int]:
    """(shortest edge, longest edge) from the folder's ``preprocessor_config.json``; (800, 1333) without one."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return 800, 1333
    try:
        config = json.loads(path.read_text())
        edges = int(config["size"]["shortest_edge"]), int(config["size"]["longest_edge"])
        mean, std = config.get("image_mean", IMAGENET_MEAN), config.get("image_std", IMAGENET_STD)
        imagenet = all(torch.allclose(torch.tensor(given).double(), torch.tensor(expected).double())
                       for given, expected in ((mean, IMAGENET_MEAN), (std, IMAGENET_STD)))
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: expected JSON with size.shortest_edge, size.longest_edge and three-channel "
                              f"image_mean and image_std ({error!r})") from None
    if not (imagenet and config.get("do_normalize", True)):
        raise CheckpointError(f"{path}: the predictor normalises with ImageNet's mean and std, not image_mean={mean}, "
                              f"image_std={std}, do_normalize={config.get('do_normalize', True)}")
    return edges


def _hub(folder: Path, model_name: Optional[str]) -> Predictor:
    """A ``transformers`` folder -> a predictor whose model is built by the matching training recipe."""
    made = {}

    def build(model_type: str, kwargs: dict) -> nn.Module:
        name = HF_RECIPES[model_type]
        if model_name not in (None, name):
            raise ValueError(f"--model {model_name}: {folder} holds a {name} model, not a {model_name}")
        made["model"], _, made["postprocess"] = MODELS[name](**kwargs)
        return made["model"]

    size, max_size = _hub_sizes(folder)
    model, config = load_hf_folder(folder, build)
    labels = config["id2label"]
    classes = tuple(str(labels.get(str(i), f"class {i}")) for i in range(len(labels)))
    return Predictor(model.eval(), made["postprocess"], classes, size, max_size, normalize=True)


def load_predictor(path: str | Path, device: str | torch.device = "cpu", model_name: Optional[str] = None,
                   dilation: bool = False) -> Predictor:
    """A :class:`Predictor` from a run folder, a trainer's checkpoint, an official DETR release or a
    ``transformers`` folder (one with ``config.json`` or ``model.safetensors`` and no ``checkpoint.pth``).

    Raises ``FileNotFoundError`` (no such file), :class:`~detr_tutorial.run_dir.CheckpointError` (truncated,
    corrupt, not weights-only, or weights of an architecture the library does not build) and
    :class:`~detr_tutorial.checkpoints.CheckpointMismatchError` (weights that do not fit the recorded model);
    each names the file. ``model_name``: refuse a checkpoint of another model.
    """
    path = Path(path)
    if path.is_dir() and not (path / CHECKPOINT).exists() and any(
            (path / name).exists() for name in ("config.json", "model.safetensors")):
        predictor = _hub(path, model_name)
    else:
        predictor = _from_file(path / CHECKPOINT if path.is_dir() else path, model_name, dilation)
    predictor.model.to(device)
    return predictor


def _from_file(path: Path, model_name: Optional[str], dilation: bool) -> Predictor:
    """A trainer's checkpoint or an official DETR release -> a predictor."""
    state = read_weights(path)
    if isinstance(state, Mapping) and all(k in state for k in TRAINING_KEYS):
        return _trained(state, str(path), model_name)
    weights = state.get("model", state) if isinstance(state, Mapping) else state
    if not (isinstance(weights, Mapping) and {"class_embed.weight", "query_embed.weight",
                                               "transformer.encoder.layers.0.linear1.weight"} <= set(weights)):
        keys = sorted(map(str, weights))[:6] if isinstance(weights, Mapping) else type(weights).__name__
        raise CheckpointError(f"{path} holds neither a detr_tutorial training checkpoint nor an official DETR "
                              f"release: weights of another architecture (first keys: {keys})")
    if model_name not in (None, "detr"):
        raise ValueError(f"--model {model_name}: {path} is an official DETR release, not a {model_name}")
    return _official_detr(weights, str(path), dilation)


def draw(image: Tensor, detections: Mapping[str, Tensor], classes: Sequence[str]) -> Tensor:
    """The uint8 image (3, H, W) with each detection's box and "name score" drawn."""
    labels = [f"{classes[int(c)]} {float(s):.2f}" for c, s in zip(detections["labels"], detections["scores"])]
    width = max(1, round(max(image.shape[-2:]) / 200))
    return draw_bounding_boxes(image, detections["boxes"], labels=labels, colors="red", width=width)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detr_tutorial.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run folder, its checkpoint.pth, an official DETR .pth, "
                                                         "or a transformers folder (config.json + model.safetensors)")
    p.add_argument("--image", required=True, help="the photo (any format Pillow reads: JPEG, PNG, ...)")
    p.add_argument("--out", default=None, help="write the photo with the detections drawn here (e.g. out.png)")
    p.add_argument("--threshold", type=float, default=0.7, help="lowest score shown (default: 0.7)")
    p.add_argument("--model", default=None, choices=sorted(MODELS), help="refuse a checkpoint of another model")
    p.add_argument("--dilation", action="store_true", help="an official DC5 release (dilated last ResNet stage)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when available)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.out is not None and Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        parser.error(f"--out {args.out}: the file name must end in .png, .jpg or .jpeg")
    try:
        device = resolve_device(args.device)
        image = read_image(args.image)
        predictor = load_predictor(args.checkpoint, device, args.model, args.dilation)
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"--checkpoint: {error}" if not str(error).startswith("--") else str(error))
    detections = predictor(image, args.threshold)
    height, width = image.shape[-2:]
    print(f"{len(detections['scores'])} detections with score >= {args.threshold:g} in {args.image} "
          f"({width} x {height} pixels); score, box x0 y0 x1 y1 in pixels, class:")
    for score, box, label in zip(detections["scores"], detections["boxes"], detections["labels"]):
        x0, y0, x1, y1 = box.tolist()
        print(f"{score:.3f} {x0:.1f} {y0:.1f} {x1:.1f} {y1:.1f} {predictor.classes[int(label)]}")
    if args.out is not None:
        F.to_pil_image(draw(image, detections, predictor.classes)).save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
