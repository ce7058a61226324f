"""Registries of the ``vlp_codebook`` scope.

Every registry is a child of the mmengine root registry of the same concern, so an
mmengine ``Runner`` started with ``default_scope='vlp_codebook'`` finds our entries and
still falls back to mmengine's own (``AdamW``, ``CosineAnnealingLR``, ``CheckpointHook``...).
``locations`` lists the modules that register entries: they are imported lazily, the first
time a registry is searched, so ``from vlp_codebook.registry import MODELS`` is cheap.

Building an unknown type raises a :class:`KeyError` that names the type and lists every
type that the registry (and its mmengine parent) knows::

    >>> from vlp_codebook.registry import MODELS
    >>> loss = MODELS.build(dict(type='CodebookOTLoss', num_codewords=64, embed_dim=32))
"""
from __future__ import annotations

import difflib
from typing import Any, List

from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import EVALUATOR as MMENGINE_EVALUATOR
from mmengine.registry import FUNCTIONS as MMENGINE_FUNCTIONS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOG_PROCESSORS as MMENGINE_LOG_PROCESSORS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import OPTIMIZERS as MMENGINE_OPTIMIZERS
from mmengine.registry import PARAM_SCHEDULERS as MMENGINE_PARAM_SCHEDULERS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import VISBACKENDS as MMENGINE_VISBACKENDS
from mmengine.registry import VISUALIZERS as MMENGINE_VISUALIZERS
from mmengine.registry import WEIGHT_INITIALIZERS as MMENGINE_WEIGHT_INITIALIZERS
from mmengine.registry import Registry

SCOPE = 'vlp_codebook'

__all__ = [
    'SCOPE', 'VLPRegistry', 'MODELS', 'DATASETS', 'TRANSFORMS', 'DATA_SAMPLERS', 'METRICS',
    'EVALUATOR', 'HOOKS', 'LOOPS', 'OPTIMIZERS', 'OPTIM_WRAPPERS', 'OPTIM_WRAPPER_CONSTRUCTORS',
    'PARAM_SCHEDULERS', 'RUNNERS', 'MODEL_WRAPPERS', 'WEIGHT_INITIALIZERS', 'VISUALIZERS',
    'LOG_PROCESSORS', 'FUNCTIONS', 'VISBACKENDS',
]


class VLPRegistry(Registry):
    """An mmengine :class:`~mmengine.registry.Registry` whose build errors list the known types."""

    def known_types(self) -> List[str]:
        """Names this registry can build: its own entries and its parents'."""
        self.import_from_location()
        names = set(self._module_dict)
        parent = self.parent
        while parent is not None:
            names.update(parent.module_dict)
            parent = parent.parent
        return sorted(names)

    def build(self, cfg: Any, *args, **kwargs) -> Any:
        type_name = cfg.get('type') if isinstance(cfg, dict) else None
        if isinstance(type_name, str) and self.get(type_name) is None:
            raise KeyError(unknown_type_message(self, type_name))
        return super().build(cfg, *args, **kwargs)


def unknown_type_message(registry: Registry, type_name: str) -> str:
    """The message for a type that ``registry`` cannot build: close matches, then all names."""
    known = registry.known_types() if isinstance(registry, VLPRegistry) else sorted(registry.module_dict)
    close = difflib.get_close_matches(type_name, known, n=3)
    hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
    return (f"type={type_name!r} is not registered in the '{registry.scope}::{registry.name}' "
            f'registry.{hint} Known types: {", ".join(known)}')


def _child(name: str, parent: Registry, *locations: str) -> VLPRegistry:
    return VLPRegistry(name, parent=parent, scope=SCOPE, locations=list(locations))


MODELS = _child('model', MMENGINE_MODELS, 'vlp_codebook.models')
MODEL_WRAPPERS = _child('model_wrapper', MMENGINE_MODEL_WRAPPERS, 'vlp_codebook.models')
WEIGHT_INITIALIZERS = _child('weight initializer', MMENGINE_WEIGHT_INITIALIZERS, 'vlp_codebook.models')
DATASETS = _child('dataset', MMENGINE_DATASETS, 'vlp_codebook.datasets')
TRANSFORMS = _child('transform', MMENGINE_TRANSFORMS, 'vlp_codebook.datasets')
DATA_SAMPLERS = _child('data sampler', MMENGINE_DATA_SAMPLERS, 'vlp_codebook.datasets')
FUNCTIONS = _child('function', MMENGINE_FUNCTIONS, 'vlp_codebook.datasets')
METRICS = _child('metric', MMENGINE_METRICS, 'vlp_codebook.evaluation')
EVALUATOR = _child('evaluator', MMENGINE_EVALUATOR, 'vlp_codebook.evaluation')
HOOKS = _child('hook', MMENGINE_HOOKS, 'vlp_codebook.engine')
LOOPS = _child('loop', MMENGINE_LOOPS, 'vlp_codebook.engine')
RUNNERS = _child('runner', MMENGINE_RUNNERS, 'vlp_codebook.engine')
LOG_PROCESSORS = _child('log_processor', MMENGINE_LOG_PROCESSORS, 'vlp_codebook.engine')
OPTIMIZERS = _child('optimizer', MMENGINE_OPTIMIZERS, 'vlp_codebook.engine')
OPTIM_WRAPPERS = _child('optim_wrapper', MMENGINE_OPTIM_WRAPPERS, 'vlp_codebook.engine')
OPTIM_WRAPPER_CONSTRUCTORS = _child('optimizer wrapper constructor',
                                    MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS, 'vlp_codebook.engine')
PARAM_SCHEDULERS = _child('parameter scheduler', MMENGINE_PARAM_SCHEDULERS, 'vlp_codebook.engine')
VISUALIZERS = _child('visualizer', MMENGINE_VISUALIZERS, 'vlp_codebook.engine')
VISBACKENDS = _child('vis_backend', MMENGINE_VISBACKENDS, 'vlp_codebook.engine')
