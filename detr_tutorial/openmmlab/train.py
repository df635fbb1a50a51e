"""Train a config with mmengine's Runner: ``python -m detr_tutorial.openmmlab.train CONFIG --work-dir DIR``.

Shaped like MMDetection's ``tools/train.py`` (3.x; 2.x and MMDetection3D's DETR3D did the same with mmcv 1.x):
load the config, merge ``--cfg-options``, choose the work dir (command line, then ``work_dir`` in the config,
then ``./work_dirs/<config name>``), import plugin code (``plugin`` / ``plugin_dir``; ``custom_imports`` is
imported by ``Config.fromfile``), build the Runner from the config and train. The work dir receives the
dumped config, a ``<timestamp>/`` folder with the log, ``epoch_N.pth`` checkpoints and ``last_checkpoint``;
``--resume`` continues from the latest of them (or from ``--resume PATH``).
"""
from __future__ import annotations

import argparse
import contextlib
import os.path as osp
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from mmengine.config import Config, DictAction
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner

from . import import_plugin
from .registry import SCOPE

__all__ = ["build_parser", "load_config", "main", "runner_checkpoint_globals"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a detector of the library with mmengine's Runner")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument("--resume", nargs="?", type=str, const="auto",
                        help="resume from the latest checkpoint in the work dir, or from the given checkpoint")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override settings of the config, key=value pairs such as train_cfg.max_epochs=3")
    return parser


def load_config(config: str, work_dir: Optional[str] = None, cfg_options: Optional[dict] = None,
                resume: Optional[str] = None) -> Config:
    """The config of ``config`` with ``cfg_options`` merged, ``work_dir`` and ``resume`` settled, plugins imported."""
    if not osp.isfile(config):
        raise FileNotFoundError(f"config file {config!r} does not exist")
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.setdefault("default_scope", SCOPE)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(config))[0])
    if resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif resume is not None:
        cfg.resume, cfg.load_from = True, resume
    import_plugin(cfg)
    return cfg


@contextlib.contextmanager
def runner_checkpoint_globals() -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` (torch >= 2.6's default) read mmengine 0.10.7's checkpoints.

    Their ``message_hub`` pickles ``HistoryBuffer`` objects (numpy arrays, and their statistics methods
    through ``getattr``); without this, ``--resume`` stops with ``UnpicklingError``. Only these globals are
    allowed, and only inside the context."""
    numpy_types = [np.ndarray, np.dtype, np._core.multiarray._reconstruct, np._core.multiarray.scalar,
                   type(np.dtype("float64")), type(np.dtype("int64"))]
    with torch.serialization.safe_globals([HistoryBuffer, getattr, *numpy_types]):
        yield


def main(argv: Optional[Sequence[str]] = None) -> Runner:
    """Parse ``argv``, build the Runner and train; returns the Runner (its ``work_dir``, ``model``, ...)."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.work_dir, args.cfg_options, args.resume)
    runner = Runner.from_cfg(cfg)
    with runner_checkpoint_globals():
        runner.train()
    return runner


if __name__ == "__main__":
    main()
