"""Loading checkpoints saved by Hugging Face ``transformers`` into the library's models.

Most DETR weights circulate as a ``transformers`` folder: ``config.json`` (the architecture) and
``model.safetensors`` (the tensors), as ``DetrForObjectDetection.save_pretrained`` writes them and
as the hub serves ``facebook/detr-resnet-50``. ``load_hf_checkpoint(folder)`` reads the config,
builds the matching model (``build_detr``, ``build_deformable_detr``, ``build_conditional_detr``,
``build_dab_detr``) and renames the tensors to the official names the library uses
(:mod:`detr_tutorial.hub_rules`), for example::

    model.encoder.layers.0.self_attn.{q,k,v}_proj.weight -> transformer.encoder.layers.0.self_attn.in_proj_weight
    model.decoder.layers.0.fc1.weight                    -> transformer.decoder.layers.0.linear1.weight
    class_labels_classifier.weight                       -> class_embed.weight

A saved DETR has one of two backbone layouts. The hub's ``facebook/detr-resnet-50`` was saved with
timm's ResNet (``use_timm_backbone: true``), whose names are torchvision's
(``model.backbone.conv_encoder.model.layer1.0.conv1.weight``); a model built with
``use_timm_backbone=False`` holds the ``transformers`` ResNet
(``...model.encoder.stages.0.layers.0.layer.0.convolution.weight``). Both become the
``backbone.0.body.*`` names of the library's torchvision ResNet. Nothing is loaded unless every
tensor finds its place: unknown, missing and misshapen tensors are named in the error.

DAB-DETR (``model_type: "dab-detr"``, ``DabDetrForObjectDetection``) is the official default model:
``num_patterns``, ``keep_query_pos``, ``normalize_before`` and a ``query_dim`` other than 4 are refused;
``random_refpoints_xy`` only initialises the anchors, so their saved values load. One numerical
difference remains: ``transformers`` clamps ``inverse_sigmoid`` at 1e-5, the official code and the
library at 1e-3, so an anchor or box coordinate within 1e-3 of 0 or 1 gives slightly different boxes.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .checkpoints import CheckpointMismatchError, check_state_dict
from .hub_rules import RESNETS, RULES
from .models import build_conditional_detr, build_dab_detr, build_deformable_detr, build_detr
from .run_dir import CheckpointError

__all__ = ["load_hf_checkpoint", "load_hf_folder", "read_hf_checkpoint", "hf_model_kwargs", "convert_hf_state_dict"]


def read_hf_checkpoint(folder: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """The ``config.json`` (a dict) and ``model.safetensors`` (name -> tensor) of a saved folder.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        CheckpointError: a file is truncated or corrupt.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; pass the folder save_pretrained wrote "
                                f"(config.json + model.safetensors)")
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a transformers checkpoint folder holds config.json "
                                    f"and model.safetensors (sharded checkpoints are not supported)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got a {type(config).__name__}")
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights_path} ({weights_path.stat().st_size} bytes) cannot be read as "
                              f"safetensors: it is truncated or corrupt ({str(error)[:200]})") from error
    return config, weights


def _require(config: dict, key: str) -> Any:
    if key not in config:
        raise ValueError(f"config.json has no {key!r}; is it the config of a DETR-family model?")
    return config[key]


def _same(config: dict, a: str, b: str) -> Any:
    """``config[a]``, refusing a config where ``config[b]`` differs (the library uses one value)."""
    value = _require(config, a)
    if config.get(b, value) != value:
        raise ValueError(f"config.json: {a}={value} and {b}={config[b]} differ; the library's "
                         f"model uses one value for both")
    return value


def _backbone_name(config: dict, levels: tuple[int, ...]) -> str:
    """The torchvision ResNet name of the config's backbone, which must return ``levels``
    (1-based ResNet stages: (4,) for DETR, (2, 3, 4) for multi-scale)."""
    sub = config.get("backbone_config")
    if sub is None or sub.get("model_type") == "timm_backbone":  # transformers 4 or 5 spelling of timm
        name = (sub or {}).get("backbone") or config.get("backbone") or "resnet50"
        name = name.removeprefix("timm/").split(".")[0]  # "timm/resnet50.a1_in1k" -> "resnet50"
        if name not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"config.json: backbone {name!r} is not a ResNet the library builds "
                             f"(resnet18, resnet34, resnet50, resnet101)")
        return name
    if sub.get("model_type") != "resnet":
        raise ValueError(f"config.json: backbone_config.model_type {sub.get('model_type')!r} is not "
                         f"supported; the library's backbones are ResNets")
    name = RESNETS.get((sub.get("layer_type"), tuple(sub.get("depths", ()))))
    width = 64 if sub.get("layer_type") == "basic" else 256
    if (name is None or sub.get("embedding_size", 64) != 64 or sub.get("downsample_in_bottleneck")
            or list(sub.get("hidden_sizes", [])) != [width * 2 ** i for i in range(4)]):
        raise ValueError(f"config.json: backbone_config (layer_type={sub.get('layer_type')}, "
                         f"depths={sub.get('depths')}, hidden_sizes={sub.get('hidden_sizes')}) is not a "
                         f"standard ResNet-18/34/50/101")
    out = tuple(sub.get("out_indices") or ())
    if out and out != levels:
        raise ValueError(f"config.json: backbone_config.out_indices {list(out)} differ from the stages "
                         f"{list(levels)} the library's model reads")
    return name


def _dab_kwargs(config: dict) -> dict:
    """The arguments of ``build_dab_detr`` that DAB-DETR's config adds, refusing the options of
    ``transformers``' DAB-DETR that the library's model (the official default one) does not have."""
    unsupported = {"num_patterns": 0, "keep_query_pos": False, "normalize_before": False, "query_dim": 4}
    for key, default in unsupported.items():
        if config.get(key, default) != default:
            raise ValueError(f"config.json: {key}={config[key]!r}; the library's DAB-DETR is built with "
                             f"{key}={default!r} only (the official default)")
    scale = config.get("sine_position_embedding_scale")
    if scale is not None and not (isinstance(scale, (int, float)) and abs(scale - 2 * math.pi) < 1e-6):
        raise ValueError(f"config.json: sine_position_embedding_scale={scale}; the library's positions use 2 pi")
    return dict(pe_temperature=_same(config, "temperature_height", "temperature_width"),
                activation=config.get("activation_function", "prelu"), backbone=_backbone_name(config, (4,)),
                dilation=bool(config.get("dilation")))


def hf_model_kwargs(config: dict) -> tuple[Callable[..., nn.Module], dict]:
    """The library's builder and its keyword arguments for a ``transformers`` config dict."""
    model_type = config.get("model_type")
    if model_type not in RULES:
        raise ValueError(f"config.json: model_type {model_type!r} is not one the library builds "
                         f"({', '.join(RULES)})")
    activations = ("prelu", "relu") if model_type == "dab-detr" else ("relu",)
    if config.get("activation_function", activations[0]) not in activations:
        raise ValueError(f"config.json: activation_function {config['activation_function']!r}; "
                         f"the library's {model_type} uses {' or '.join(map(repr, activations))}")
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise ValueError("config.json: id2label must name the classes (it sets num_classes)")
    width = "hidden_size" if model_type == "dab-detr" else "d_model"
    kwargs = dict(num_classes=len(id2label), hidden_dim=_require(config, width),
                  nheads=_same(config, "encoder_attention_heads", "decoder_attention_heads"),
                  enc_layers=_require(config, "encoder_layers"), dec_layers=_require(config, "decoder_layers"),
                  dim_feedforward=_same(config, "encoder_ffn_dim", "decoder_ffn_dim"),
                  num_queries=_require(config, "num_queries"), aux_loss=bool(config.get("auxiliary_loss", False)))
    if model_type == "dab-detr":
        return build_dab_detr, {**kwargs, **_dab_kwargs(config)}
    if model_type == "deformable_detr":
        levels = config.get("num_feature_levels", 4)
        if config.get("two_stage") and config.get("two_stage_num_proposals") != _require(config, "num_queries"):
            raise ValueError(f"config.json: two_stage_num_proposals ({config.get('two_stage_num_proposals')}) "
                             f"must equal num_queries ({config['num_queries']}) for the library's model")
        kwargs.update(num_feature_levels=levels, enc_n_points=_require(config, "encoder_n_points"),
                      dec_n_points=_require(config, "decoder_n_points"), two_stage=bool(config.get("two_stage")),
                      with_box_refine=bool(config.get("with_box_refine")),
                      backbone=_backbone_name(config, (2, 3, 4) if levels > 1 else (4,)))
        return build_deformable_detr, kwargs
    if config.get("position_embedding_type", "sine") not in ("sine", "learned"):
        raise ValueError(f"config.json: position_embedding_type {config['position_embedding_type']!r}; "
                         f"the library knows 'sine' and 'learned'")
    kwargs.update(backbone=_backbone_name(config, (4,)), dilation=bool(config.get("dilation")),
                  position_embedding=config.get("position_embedding_type", "sine"))
    return (build_detr if model_type == "detr" else build_conditional_detr), kwargs


def _rename(key: str, rules: list) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def convert_hf_state_dict(weights: dict[str, Tensor], model_type: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rename a ``transformers`` state dict of ``model_type`` to the library's names.

    The separate ``q_proj``/``k_proj``/``v_proj`` of a dense attention are stacked into
    ``in_proj_weight`` (3d, d) and ``in_proj_bias`` (3d,), as ``nn.MultiheadAttention`` stores them;
    a ``q/k/v_proj`` tensor without its two partners keeps its name (and then fits no model).
    BatchNorm's ``num_batches_tracked`` counters are dropped.

    Returns:
        ``(state_dict, origin)``: the renamed tensors, and for each new name the original one.
    """
    rules = RULES[model_type]
    renamed = {_rename(k, rules): (k, v) for k, v in weights.items()
               if not k.endswith(".num_batches_tracked")}  # a BatchNorm counter; frozen BatchNorm has none
    state, origin = {}, {}
    for key, (original, tensor) in renamed.items():
        match = re.fullmatch(r"(.*)\.([qkv])_proj\.(weight|bias)", key)
        parts = match and [renamed.get(f"{match[1]}.{p}_proj.{match[3]}") for p in "qkv"]
        if match is None or any(part is None for part in parts):
            state[key], origin[key] = tensor, original
        elif match[2] == "q":
            key = f"{match[1]}.in_proj_{match[3]}"
            state[key] = torch.cat([part[1] for part in parts])
            origin[key] = "/".join(part[0] for part in parts)
    return state, origin


def _fill_shared(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give every name of a tensor the model shares between modules the value saved under one of them:
    ``transformers`` saves a shared (tied) tensor once, e.g. the class head that all Deformable DETR
    decoder layers share as ``class_embed.0`` only, or the box-refinement heads under ``model.decoder``."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    for names in groups.values():
        saved = [n for n in names if n in state]
        for name in names:
            if saved and name not in state:
                state[name] = state[saved[0]]


def _kwargs_for(folder: Path, config: dict) -> tuple[Callable[..., nn.Module], dict]:
    """``hf_model_kwargs(config)`` whose errors name the folder's config.json."""
    try:
        return hf_model_kwargs(config)
    except ValueError as error:
        message, path = str(error), folder / "config.json"
        raise ValueError(f"{path}{message.removeprefix('config.json')}" if message.startswith("config.json")
                         else f"{path}: {message}") from None


def load_hf_folder(folder: str | Path, build: Optional[Callable[[str, dict], nn.Module]] = None,
                   **overrides: Any) -> tuple[nn.Module, dict]:
    """:func:`load_hf_checkpoint` that also returns the ``config.json`` dict; ``build(model_type, kwargs)``,
    when given, builds the model instead of the library's builder (e.g. through a training recipe)."""
    folder = Path(folder)
    config, weights = read_hf_checkpoint(folder)
    builder, kwargs = _kwargs_for(folder, config)
    kwargs = {**kwargs, **overrides}
    model = builder(**kwargs) if build is None else build(config["model_type"], kwargs)
    state, origin = convert_hf_state_dict(weights, config["model_type"])
    _fill_shared(model, state)
    file = folder / "model.safetensors"
    own = model.state_dict()
    unknown = sorted(origin[k] for k in state if k not in own)
    if unknown:
        raise CheckpointMismatchError(f"{file}: {len(unknown)} tensor(s) of this {config['model_type']} "
                                      f"checkpoint have no place in the library's model: "
                                      f"{', '.join(unknown[:20])}{' ...' if len(unknown) > 20 else ''}")
    try:
        check_state_dict(model, state)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{file}, renamed to the library's names: {error}") from None
    model.load_state_dict(state, strict=True)
    return model, config


def load_hf_checkpoint(folder: str | Path, **overrides: Any) -> nn.Module:
    """Build the library's model for a ``save_pretrained`` folder and load its weights.

    Args:
        folder: holds ``config.json`` and ``model.safetensors`` (e.g. a local copy of
            ``facebook/detr-resnet-50``).
        overrides: keyword arguments for the builder that the config does not fix
            (e.g. ``dropout=0.0``, ``aux_loss=True``, ``train_backbone=False``).

    Returns:
        a ``DETR``, ``DeformableDETR``, ``ConditionalDETR`` or ``DABDETR`` (in training mode, as built)
        whose outputs equal the ``transformers`` model's on the same input; its ``num_classes`` is the
        number of entries of ``id2label``.

    Raises:
        FileNotFoundError, CheckpointError: a file is missing, truncated or corrupt.
        ValueError: the config describes an architecture the library does not build (names the config.json).
        CheckpointMismatchError: tensors that find no place in the model, or that it lacks, by name.
    """
    return load_hf_folder(folder, **overrides)[0]
