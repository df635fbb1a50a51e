"""mmengine looks up ``<scope>.registry`` when a config's ``default_scope`` is ``'detr_tutorial'``; the
registries live in :mod:`detr_tutorial.openmmlab.registry` (this module imports mmengine)."""
from .openmmlab.registry import DATASETS, FUNCTIONS, HOOKS, METRICS, MODELS, SCOPE  # noqa: F401
