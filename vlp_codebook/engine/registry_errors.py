"""Unknown-type errors raised while the Runner builds a config, made to list the known types.

Why: :class:`vlp_codebook.registry.VLPRegistry` lists the known types when *it* builds, but
the mmengine ``Runner`` builds through mmengine's root registries (``mmengine.registry.MODELS``
...), which switch to our child registry by ``default_scope`` and then raise their own
``KeyError('X is not in the vlp_codebook::model registry. Please check ...')`` without the
list. :func:`explain_unknown_types` turns exactly that message into
:func:`vlp_codebook.registry.unknown_type_message` (close matches + every known type); any
other ``KeyError`` passes through untouched.

Usage::

    with explain_unknown_types():
        runner = Runner.from_cfg(cfg)
        runner.train()
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Optional

from mmengine.registry import Registry

from vlp_codebook import registry as vlp_registry
from vlp_codebook.registry import unknown_type_message

__all__ = ['explain_unknown_types', 'registry_for']

_MMENGINE_UNKNOWN_TYPE = re.compile(r'(?P<type>\S+) is not in the (?:(?P<scope>[\w.-]+)::)?(?P<name>[\w ]+?) registry\.')


def registry_for(scope: Optional[str], name: str) -> Optional[Registry]:
    """Our registry called ``name`` (``'model'``, ``'dataset'``...), or None.

    mmengine's root registries (scope ``'mmengine'``) map to our children too: their known
    types are a subset of our children's (a child sees its parent's entries).
    """
    if scope not in (None, vlp_registry.SCOPE, 'mmengine'):
        return None
    for attr in vlp_registry.__all__:
        candidate = getattr(vlp_registry, attr)
        if isinstance(candidate, Registry) and candidate.name == name:
            return candidate
    return None


@contextmanager
def explain_unknown_types() -> Iterator[None]:
    """Re-raise mmengine's unknown-type ``KeyError`` with the list of known types."""
    try:
        yield
    except KeyError as error:
        message = error.args[0] if error.args and isinstance(error.args[0], str) else ''
        match = _MMENGINE_UNKNOWN_TYPE.search(message)
        if match is None or 'Known types:' in message:
            raise
        registry = registry_for(match.group('scope'), match.group('name'))
        if registry is None:
            raise
        raise KeyError(unknown_type_message(registry, match.group('type'))) from error
