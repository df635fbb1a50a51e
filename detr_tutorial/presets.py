"""Named training configurations: one source of truth for the book, the CLI and the benchmark.

A :class:`Preset` is a row of settings: the data (:class:`~detr_tutorial.data.DataConfig`), the
batch size, the optimisation (:class:`~detr_tutorial.engine.TrainConfig`) and, per model name, the
keyword arguments of that model's builder. What a model trains with (criterion, matcher,
post-processing) is its recipe in :mod:`detr_tutorial.recipes`; ``MODELS`` is that table. A new
architecture adds its recipe there and its keyword arguments to the presets it supports
(``PRESETS[name].models["dab_detr"] = {...}``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch.utils.data import DataLoader

from .data import DataConfig, shapes_loaders
from .data.coco_loaders import CocoConfig, coco_loaders
from .detr3d_training import MultiViewConfig, evaluate_detr3d, multiview_loaders
from .engine import TrainConfig, Trainer
from .recipes import RECIPES, build_deformable_detr_training, build_detr_training

__all__ = ["MODELS", "PRESETS", "DataConfig", "Preset", "build_deformable_detr_training", "build_detr_training",
           "build_loaders", "describe_run", "get_coco_preset", "get_preset", "make_trainer"]

#: model name -> ``build(num_classes, **kwargs) -> (model, criterion, postprocess)`` (see :mod:`detr_tutorial.recipes`).
MODELS = RECIPES


@dataclass(frozen=True)
class Preset:
    """Data (the shapes, or the multi-camera world for DETR3D), batch size, optimisation, and the builder
    arguments of each supported model."""

    description: str
    data: DataConfig | MultiViewConfig
    batch_size: int
    train: TrainConfig
    models: dict[str, dict] = field(default_factory=dict)


_SMALL_DETR = dict(backbone="small", small_widths=(16, 32, 64), small_strides=(2, 2, 2), hidden_dim=64, nheads=4,
                   enc_layers=2, dec_layers=3, dim_feedforward=128, num_queries=8, dropout=0.0)

PRESETS: dict[str, Preset] = {
    "shapes_cpu": Preset(
        description="DETR that learns the shapes dataset in a few CPU minutes (chapter 10)",
        data=DataConfig(num_train=4000, num_val=500),
        batch_size=32,
        train=TrainConfig(epochs=16, lr=1e-3, lr_backbone=1e-3, weight_decay=1e-4, lr_drop=12, warmup_steps=200,
                          clip_max_norm=0.1, eval_every=2),
        models={"detr": _SMALL_DETR},
    ),
    "tiny": Preset(
        description="a smoke test: a few steps on a handful of images",
        data=DataConfig(num_train=16, num_val=8, image_size=32),
        batch_size=8,
        train=TrainConfig(epochs=2, lr=1e-3, lr_backbone=1e-3, warmup_steps=2, eval_every=1),
        models={"detr": dict(_SMALL_DETR, small_widths=(8, 8, 16), hidden_dim=16, nheads=2, enc_layers=1,
                             dec_layers=2, dim_feedforward=32, num_queries=6)},
    ),
}


# Chapter 10's live run: the first half of ``shapes_cpu``'s schedule (8 of 16 epochs, all before its drop after
# epoch 12), so that the chapter trains in a few minutes; the whole schedule runs through the CLI.
PRESETS["shapes_live"] = dataclasses.replace(
    PRESETS["shapes_cpu"], description="the first 8 epochs of shapes_cpu, trained live in chapter 10",
    train=dataclasses.replace(PRESETS["shapes_cpu"].train, epochs=8))

# Deformable DETR: same data, backbone and transformer sizes as DETR (chapters 12 and 13).
PRESETS["shapes_cpu"].models["deformable_detr"] = dict(_SMALL_DETR)
PRESETS["tiny"].models["deformable_detr"] = dict(PRESETS["tiny"].models["detr"])

# The convergence race (chapter 13): chapter 10's data and schedule for both models, evaluated after every epoch.
# Deformable DETR's backbone has two more stride-2 stages, so its levels sit at strides 8/16/32 (+64 from the
# extra conv), as in the paper; DETR reads the stride-8 map, the output of the same first three stages (at 64 px
# a stride-32 map would be 2 x 2 pixels). ``--image-size`` scales images and objects to vary the token count.
PRESETS["race"] = Preset(
    description="DETR vs Deformable DETR on chapter 10's data and schedule (chapter 13)",
    data=PRESETS["shapes_cpu"].data,
    batch_size=PRESETS["shapes_cpu"].batch_size,
    train=dataclasses.replace(PRESETS["shapes_cpu"].train, eval_every=1),
    models={"detr": dict(_SMALL_DETR),
            "deformable_detr": dict(_SMALL_DETR, small_widths=(16, 32, 64, 64, 64), small_strides=(2, 2, 2, 2, 2))},
)

# The same race on a schedule three times as long (the drop stays at 3/4 of it), for settings in which DETR is
# still on its plateau after 16 epochs; it runs through the CLI (one to 1.5 hours per model on one core at 128 px).
PRESETS["race_long"] = dataclasses.replace(
    PRESETS["race"], description="the race on a 3x longer schedule (chapter 13, command line only)",
    train=dataclasses.replace(PRESETS["race"].train, epochs=48, lr_drop=36))


# Conditional DETR and DAB-DETR change only the decoder queries: they train at DETR's sizes on DETR's backbone, in
# every preset (chapters 14 and 15). ``race_long`` shares ``race``'s table, so it gets them too.
for _preset in PRESETS.values():
    for _name in ("conditional_detr", "dab_detr"):
        _preset.models.setdefault(_name, dict(_preset.models["detr"]))

# DN-DETR is DAB-DETR plus denoising and DINO is Deformable DETR plus denoising (chapters 22-24): each gets its parent's
# sizes in every preset that has the parent, and a denoising budget for images of at most 4 objects and 8 queries.
# DN-DETR keeps the official 5 groups (``--scalar 5``): at most 5 x 4 = 20 denoising queries. DINO's ``dn_number`` of
# 100 would make 100 // 4 = 25 groups (200 queries, 25 times the 8 matching ones); below 50, ``dn_number`` is not
# divided by the object count but doubled (``denoising.num_dn_groups``), so 2 gives 4 groups of a positive and a
# negative per object: at most 32 queries, near DN-DETR's 20. The box noise is the 1.0 of DINO's training scripts
# (its config says 0.4).
for _preset in PRESETS.values():
    if "dab_detr" in _preset.models:
        _preset.models.setdefault("dn_detr", dict(_preset.models["dab_detr"], scalar=5))
    if "deformable_detr" in _preset.models:
        _preset.models.setdefault("dino", dict(_preset.models["deformable_detr"], dn_number=2, dn_box_noise_scale=1.0))

def get_preset(name: str, data: Optional[dict] = None, **train_overrides) -> Preset:
    """``PRESETS[name]`` with ``DataConfig`` fields replaced by ``data`` (e.g. ``{"image_size": 128}``)
    and ``TrainConfig`` fields by ``train_overrides`` (e.g. ``epochs=3``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    for given, config in ((data or {}, type(preset.data)), (train_overrides, TrainConfig)):
        fields = [f.name for f in dataclasses.fields(config)]
        unknown = set(given) - set(fields)
        if unknown:
            raise ValueError(f"overrides {sorted(unknown)} are not {config.__name__} fields; choose from {fields}")
    return dataclasses.replace(preset, data=dataclasses.replace(preset.data, **(data or {})),
                               train=dataclasses.replace(preset.train, **train_overrides))


def build_loaders(preset: Preset) -> tuple[DataLoader, DataLoader, tuple[str, ...]]:
    """The preset's data as ``(train, val, classes)`` loaders: :func:`detr_tutorial.data.shapes_loaders`,
    :func:`detr_tutorial.data.coco_loaders` for a COCO folder (see :func:`get_coco_preset`), or
    :func:`detr_tutorial.detr3d_training.multiview_loaders` for a ``MultiViewConfig``."""
    _check_preset(preset)
    if isinstance(preset.data, CocoConfig):
        return coco_loaders(preset.data, preset.batch_size)
    if isinstance(preset.data, MultiViewConfig):
        return multiview_loaders(preset.data, preset.batch_size)
    return shapes_loaders(preset.data, preset.batch_size)


def make_trainer(preset: Preset | str, model: str = "detr", device: str = "cpu", out_dir: Optional[str | Path] = None,
                 progress: bool = True, callbacks: tuple = ()) -> Trainer:
    """Data, model, criterion, post-processing and :class:`Trainer` for ``preset`` and ``model``.

    The trainer's checkpoints record :func:`describe_run` (model name, data,
    batch size, model settings); resuming with other settings is refused."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    _check_preset(preset)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODELS)}")
    if model not in preset.models:
        raise ValueError(f"the preset has no settings for model {model!r}; it has {sorted(preset.models)}")
    train_loader, val_loader, classes = build_loaders(preset)
    net, criterion, postprocess = MODELS[model](len(classes), **preset.models[model])
    return Trainer(net, criterion, train_loader, preset.train, val_loader=val_loader, postprocess=postprocess,
                   classes=classes, device=device, out_dir=out_dir, callbacks=callbacks, progress=progress,
                   run=describe_run(preset, model),
                   evaluator=evaluate_detr3d if isinstance(preset.data, MultiViewConfig) else None)


def _check_preset(preset: object) -> None:
    if not isinstance(preset, Preset):
        raise TypeError(f"preset must be a Preset or a preset name, got {type(preset).__name__}")


def describe_run(preset: Preset, model: str) -> dict:
    """What a run's checkpoint records besides the optimisation: model name, data, batch size, model settings,
    as plain JSON values (a setting that JSON cannot hold is recorded by its ``repr``)."""
    run = {"model": model, "data": dataclasses.asdict(preset.data), "batch_size": preset.batch_size,
           "model_kwargs": dict(preset.models[model])}
    return json.loads(json.dumps(run, default=repr))


def get_coco_preset(name: str, data: CocoConfig, **train_overrides) -> Preset:
    """``PRESETS[name]`` (model sizes, batch size, optimisation with ``train_overrides``) trained on the COCO
    folder ``data`` instead of the shapes: ``make_trainer(get_coco_preset("shapes_cpu", CocoConfig(...)))``."""
    if not isinstance(data, CocoConfig):
        raise TypeError(f"data must be a detr_tutorial.data.CocoConfig, got {type(data).__name__}")
    return dataclasses.replace(get_preset(name, **train_overrides), data=data)


# DETR3D: the multi-camera world (``MultiViewConfig`` instead of the shapes' ``DataConfig``), a
# CPU-sized model and DETR3D's own evaluation (nuScenes-style mAP by centre distance). The backbone's last three
# stages sit at strides 4/8/16 of the 64 x 112 images (+32 from the extra conv): at strides 2/4/8 the backbone
# took three quarters of a step. The world's objects stand 3-20 m away instead of 3-40 m: in two 5-minute probes
# with everything else equal (a scratch centre-distance mAP on 200 held-out scenes, same thresholds) the near
# world reached 0.048 after 125 steps, the far one 0.006 after 263, both with AP 0 at 0.5 and 1 m: the small model
# learns depth and range slowest. ``detr3d_cpu`` (1200 steps) and ``detr3d_long`` (up to 4000) are recorded
# command-line runs, stopped after 30 minutes of training at the latest; chapter 20 trains the first two of
# ``detr3d_cpu``'s epochs live (600 steps, about 0.2-0.25 CPU seconds each on one thread). ``detr3d_live`` is
# the same number of steps as one epoch over 2,400 scenes (recorded; the OpenMMLab config `detr3d_mini.py`
# mirrors it), ``detr3d_tiny`` a smoke test.
_NEAR = MultiViewConfig(num_train=1200, num_val=200, distance=(3.0, 20.0))
_DETR3D = dict(small_widths=(16, 32, 64, 64), small_strides=(2, 2, 2, 2), hidden_dim=64, nheads=4, dec_layers=3,
               dim_feedforward=128, num_queries=30, dropout=0.0, num_levels=4, num_cams=6,
               pc_range=_NEAR.dataset("val").pc_range, max_num=100)
PRESETS["detr3d_cpu"] = Preset(
    description="a mini DETR3D on the multi-camera world (objects 3-20 m away), recorded from the command line",
    data=_NEAR,
    batch_size=4,
    train=TrainConfig(epochs=4, lr=2e-3, lr_backbone=2e-3, weight_decay=1e-2, lr_drop=3, warmup_steps=50,
                      clip_max_norm=35.0, eval_every=1, max_seconds=1800.0),
    models={"detr3d": dict(_DETR3D)},
)
# The same model and world on a schedule that fills the 30 minutes when the machine is quiet (4000 scenes, 4
# epochs, about 0.35 s per step on one thread), cut at 30 minutes of training otherwise.
PRESETS["detr3d_long"] = dataclasses.replace(
    PRESETS["detr3d_cpu"], description="detr3d_cpu on 4000 scenes: up to 30 minutes of training, command line only",
    data=dataclasses.replace(_NEAR, num_train=4000),
    models={"detr3d": dict(_DETR3D)})
PRESETS["detr3d_live"] = dataclasses.replace(
    PRESETS["detr3d_cpu"], description="the mini DETR3D on a live-sized schedule (a few minutes on a quiet CPU)",
    data=dataclasses.replace(_NEAR, num_train=2400),
    train=dataclasses.replace(PRESETS["detr3d_cpu"].train, epochs=1, lr_drop=1, max_seconds=None),
    models={"detr3d": dict(_DETR3D)})
PRESETS["detr3d_tiny"] = Preset(
    description="a DETR3D smoke test: a few steps on a handful of scenes with 4 small cameras",
    data=MultiViewConfig(num_train=8, num_val=4, num_cams=4, image_hw=(32, 48), distance=(3.0, 20.0)),
    batch_size=4,
    train=TrainConfig(epochs=2, lr=1e-3, lr_backbone=1e-3, warmup_steps=1, eval_every=1),
    models={"detr3d": dict(_DETR3D, small_widths=(8, 8, 16), small_strides=(2, 2, 2), hidden_dim=16, nheads=2,
                           dec_layers=2, dim_feedforward=32, num_queries=6, num_cams=4)},
)
