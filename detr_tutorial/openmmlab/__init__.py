"""The OpenMMLab view of the library: mmengine registries, configs, and a Runner entry point.

``MODELS.build(cfg.model)`` builds the library's DETR family from a config written as MMDetection writes
it (``configs/`` next to this file; :func:`config_path` finds them); :mod:`.train` is the command line
``python -m detr_tutorial.openmmlab.train CONFIG --work-dir DIR``.
"""
from __future__ import annotations

from pathlib import Path

from . import detectors, parts, runtime  # noqa: F401  (their register_module() calls fill the registries)
from .detectors import Detector, SetPredictionHead
from .from_preset import preset_options
from .plugins import import_plugin, plugin_module_name
from .registry import DATA_SAMPLERS, DATASETS, FUNCTIONS, HOOKS, METRICS, MODELS, SCOPE
from .runtime import CocoAPMetric, GlobalRandomSampler, MetricsLogHook, RenderedShapes, TrainRNGHook

__all__ = ["CocoAPMetric", "DATASETS", "DATA_SAMPLERS", "Detector", "FUNCTIONS", "GlobalRandomSampler", "HOOKS", "METRICS",
           "MODELS", "MetricsLogHook", "RenderedShapes", "SCOPE", "SetPredictionHead", "TrainRNGHook", "config_path",
           "import_plugin", "plugin_module_name", "preset_options"]

CONFIG_DIR = Path(__file__).parent / "configs"


def config_path(name: str) -> Path:
    """The path of a bundled config, e.g. ``config_path('detr/detr_shapes_cpu.py')``."""
    path = CONFIG_DIR / name
    if not path.is_file():
        available = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.py"))
        raise ValueError(f"no config {name!r}; available: {available}")
    return path
