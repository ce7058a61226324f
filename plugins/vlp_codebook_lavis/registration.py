"""Idempotent registration in LAVIS's registry (``lavis.common.registry.registry``).

LAVIS's ``register_model(name)`` raises ``KeyError`` when ``name`` is taken, so a re-import
(``importlib.reload``) would fail. :func:`register_once` rebinds a name bound to *our own* class
(same module and qualified name); a name bound to anybody else's class is an error naming both.

Example::

    >>> from lavis.common.registry import registry
    >>> from vlp_codebook_lavis.registration import register_once
    >>> from vlp_codebook_lavis.models import CodisRetrieval
    >>> _ = register_once('model', 'codis_retrieval', CodisRetrieval)   # fine: a re-registration
    >>> registry.get_model_class('codis_retrieval') is CodisRetrieval
    True
"""
from __future__ import annotations

from lavis.common.registry import registry

__all__ = ['register_once', 'KINDS']

# kind -> (LAVIS's registration decorator factory, the mapping it fills)
KINDS = {
    'model': ('register_model', 'model_name_mapping'),
    'task': ('register_task', 'task_name_mapping'),
    'builder': ('register_builder', 'builder_name_mapping'),
    'processor': ('register_processor', 'processor_name_mapping'),
}


def _same_class(a: type, b: type) -> bool:
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)


def register_once(kind: str, name: str, cls: type) -> type:
    """Register ``cls`` under ``name`` (``arch``, ``run.task``...) in LAVIS's ``kind`` mapping
    (``'model', 'task', 'builder', 'processor'``), tolerating re-imports; returns ``cls``.
    ``KeyError`` when ``name`` is bound to a class that is neither ``cls`` nor a re-import of it."""
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {sorted(KINDS)}, got {kind!r}')
    decorator_name, mapping_name = KINDS[kind]
    mapping = registry.mapping[mapping_name]
    current = mapping.get(name)
    if current is not None:
        if not _same_class(current, cls):
            raise KeyError(f'LAVIS {kind} name {name!r} is already registered to '
                           f'{current.__module__}.{current.__qualname__}; cannot register '
                           f'{cls.__module__}.{cls.__qualname__} under it')
        del mapping[name]  # a re-import of our own class: rebind to the new class object
    getattr(registry, decorator_name)(name)(cls)
    return cls
