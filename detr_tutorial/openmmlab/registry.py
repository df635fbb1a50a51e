"""The library's registries, children of mmengine's roots, in the scope ``detr_tutorial``.

MMDetection 3.x declares the same children in ``mmdet/registry.py`` (scope ``mmdet``); MMDetection 2.x
and mmcv 1.x called the detector registry ``DETECTORS`` (``mmdet/models/builder.py``). A config built
by mmengine's :class:`~mmengine.runner.Runner` with ``default_scope = 'detr_tutorial'`` finds its types
here; ``MODELS.build(cfg)`` finds them directly.
"""
from __future__ import annotations

import mmengine.registry as root
from mmengine.registry import Registry

__all__ = ["DATASETS", "DATA_SAMPLERS", "FUNCTIONS", "HOOKS", "METRICS", "MODELS", "SCOPE"]

#: The scope of the library's registries (``default_scope`` in a config).
SCOPE = "detr_tutorial"
_LOCATIONS = ["detr_tutorial.openmmlab"]

MODELS = Registry("model", parent=root.MODELS, scope=SCOPE, locations=_LOCATIONS)
DATASETS = Registry("dataset", parent=root.DATASETS, scope=SCOPE, locations=_LOCATIONS)
FUNCTIONS = Registry("function", parent=root.FUNCTIONS, scope=SCOPE, locations=_LOCATIONS)
METRICS = Registry("metric", parent=root.METRICS, scope=SCOPE, locations=_LOCATIONS)
HOOKS = Registry("hook", parent=root.HOOKS, scope=SCOPE, locations=_LOCATIONS)
DATA_SAMPLERS = Registry("data sampler", parent=root.DATA_SAMPLERS, scope=SCOPE, locations=_LOCATIONS)

# Empty children of the Runner's other registries (loops, optimizers, schedulers, ...), as mmdet/registry.py
# declares them: with ``default_scope='detr_tutorial'`` the Runner finds mmengine's types through them.
_OTHERS = {name: Registry(getattr(root, name).name, parent=getattr(root, name), scope=SCOPE, locations=_LOCATIONS)
           for name in ("RUNNERS", "RUNNER_CONSTRUCTORS", "LOOPS", "TRANSFORMS", "MODEL_WRAPPERS",
                        "WEIGHT_INITIALIZERS", "OPTIMIZERS", "OPTIM_WRAPPERS", "OPTIM_WRAPPER_CONSTRUCTORS",
                        "PARAM_SCHEDULERS", "EVALUATOR", "TASK_UTILS", "VISUALIZERS", "VISBACKENDS",
                        "LOG_PROCESSORS", "INFERENCERS")}
