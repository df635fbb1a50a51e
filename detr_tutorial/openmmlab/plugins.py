"""Plugin code imported so that its ``register_module()`` decorators run, as MMDetection3D projects do.

DETR3D's ``tools/train.py`` reads ``plugin=True`` and ``plugin_dir='projects/mmdet3d_plugin/'`` from the config,
turns the folder into a dotted module path relative to the working directory and imports it with
``importlib.import_module``; mmengine's own route is ``custom_imports = dict(imports=[...])``, imported by
``Config.fromfile``. :func:`import_plugin` is the first route with an error that names the plugin.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

__all__ = ["import_plugin", "plugin_module_name"]


def plugin_module_name(plugin_dir: str) -> str:
    """``'projects/mmdet3d_plugin/'`` -> ``'projects.mmdet3d_plugin'`` (as DETR3D's ``tools/train.py``)."""
    if not isinstance(plugin_dir, str) or not plugin_dir.strip("/"):
        raise ValueError(f"plugin_dir must be a folder path such as 'projects/my_plugin/', got {plugin_dir!r}")
    parts = os.path.normpath(plugin_dir).replace(os.sep, "/").strip("/").split("/")
    if os.path.isabs(plugin_dir) or ".." in parts or not all(p.isidentifier() for p in parts):
        raise ValueError(f"plugin_dir must be a relative folder of importable names, got {plugin_dir!r}")
    return ".".join(parts)


def import_plugin(cfg) -> Optional[ModuleType]:
    """Import ``cfg.plugin_dir`` when ``cfg.plugin`` is true; returns the module (None without a plugin).

    Raises ``ImportError`` naming ``plugin_dir`` and the module when the import fails (the original error
    is its cause), and ``ValueError`` when ``plugin`` is set without ``plugin_dir``.
    """
    if not cfg.get("plugin", False):
        return None
    plugin_dir = cfg.get("plugin_dir")
    if plugin_dir is None:
        raise ValueError("the config sets plugin=True but no plugin_dir (e.g. 'projects/my_plugin/')")
    name = plugin_module_name(plugin_dir)
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise ImportError(f"plugin_dir={plugin_dir!r}: importing module {name!r} failed: "
                          f"{type(error).__name__}: {error}") from error
