"""The mini DETR3D as an OpenMMLab plugin, laid out as WangYueFt/detr3d's ``projects/mmdet3d_plugin``.

A config names this folder (``plugin = True``, ``plugin_dir = 'detr_tutorial/openmmlab/detr3d_plugin/'``); the
entry point (:func:`detr_tutorial.openmmlab.import_plugin`) imports it, and importing it imports its modules,
whose ``register_module()`` calls put ``Detr3D``, ``Detr3DHead``, ``HungarianAssigner3D``, ``NMSFreeCoder``,
``MultiViewWorld``, ``multiview_collate`` and ``NuScenesMetric`` into the library's registries. Nothing else
imports it: without the plugin lines a config's ``type='Detr3D'`` is unknown, as in the official repository.
"""
from .datasets import MultiViewWorld, NuScenesMetric
from .models import Detr3D, Detr3DHead, HungarianAssigner3D, MultiViewDetector, NMSFreeCoder

__all__ = ["Detr3D", "Detr3DHead", "HungarianAssigner3D", "MultiViewDetector", "MultiViewWorld", "NMSFreeCoder",
           "NuScenesMetric"]
