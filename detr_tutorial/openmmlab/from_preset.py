"""A library preset as ``--cfg-options`` for the shapes configs (or the DETR3D plugin's multi-camera world):
the same data, batch size and schedule.

:func:`preset_options` turns :class:`~detr_tutorial.presets.Preset`'s :class:`~detr_tutorial.data.DataConfig`
and :class:`~detr_tutorial.engine.TrainConfig` into the keys of ``configs/_base_/datasets/shapes_detection.py``
and of a shapes config's optimizer and schedule, so the Runner trains what the book's engine trains:
AdamW (``lr``, ``weight_decay``, PyTorch's fused kernel as the engine's ``build_optimizer`` picks on
CPU and CUDA; the backbone at ``lr_backbone / lr`` times the rate), gradient clipping at
``clip_max_norm``, a linear warm-up over ``warmup_steps`` iterations (``LinearLR`` from ``1 / warmup_steps``:
mmengine's factor ``start + (1 - start) * t / (warmup_steps - 1)`` is the engine's ``(t + 1) / warmup_steps``,
computed as a running product, so equal to about 1e-15 relative), the rate times ``lr_gamma`` every
``lr_drop`` epochs (``MultiStepLR``), validation every ``eval_every`` epochs. The model's settings stay the
config's own.
"""
from __future__ import annotations

from ..detr3d_training import MultiViewConfig
from ..presets import Preset

__all__ = ["preset_options"]


def preset_options(preset: Preset) -> dict:
    """``{dotted key: value}`` for ``Config.merge_from_dict`` (or ``--cfg-options``) from ``preset``."""
    if not isinstance(preset, Preset):
        raise TypeError(f"preset must be a Preset (detr_tutorial.presets.get_preset(name)), got {type(preset).__name__}")
    data, train = preset.data, preset.train
    if train.max_seconds is not None:
        raise ValueError("preset.train.max_seconds has no Runner counterpart; use a preset without it")
    if isinstance(data, MultiViewConfig):  # the DETR3D plugin's world (configs/_base_/datasets/multiview_world.py)
        kind, count = "MultiViewWorld", "num_scenes"
        settings = dict(num_cams=data.num_cams, image_hw=tuple(data.image_hw), min_objects=data.min_objects,
                      max_objects=data.max_objects, distance=tuple(data.distance))
    else:
        kind, count = "ShapesDataset", "num_images"
        settings = dict(image_size=data.image_size, max_objects=data.max_objects, object_size=tuple(data.object_size))
    schedulers = []
    if train.warmup_steps:
        schedulers.append(dict(type="LinearLR", start_factor=1 / train.warmup_steps, by_epoch=False, begin=0,
                               end=train.warmup_steps))
    schedulers.append(dict(type="MultiStepLR", begin=0, end=train.epochs, by_epoch=True, gamma=train.lr_gamma,
                           milestones=list(range(train.lr_drop, train.epochs, train.lr_drop))))
    return {
        "train_dataloader.batch_size": preset.batch_size,
        "train_dataloader.dataset": dict(type=kind, **{count: data.num_train}, seed=data.train_seed, **settings),
        "val_dataloader.dataset": dict(type=kind, **{count: data.num_val}, seed=data.val_seed, **settings),
        "test_dataloader.dataset": dict(type=kind, **{count: data.num_val}, seed=data.val_seed, **settings),
        "optim_wrapper.optimizer.lr": train.lr,
        "optim_wrapper.optimizer.weight_decay": train.weight_decay,
        "optim_wrapper.optimizer.fused": True,
        "optim_wrapper.clip_grad": dict(max_norm=train.clip_max_norm, norm_type=2) if train.clip_max_norm else None,
        "optim_wrapper.paramwise_cfg.custom_keys.backbone.lr_mult": train.lr_backbone / train.lr,
        "train_cfg.max_epochs": train.epochs,
        "train_cfg.val_interval": train.eval_every or train.epochs,
        "param_scheduler": schedulers,
    }
