"""mmengine loads every checkpoint through the schema reader (:mod:`vlp_codebook.checkpoint_io`).

Inside a :func:`checkpoint_loading` block, local paths go to :func:`load_from_safe_local` and every
other scheme mmengine knows (``http(s)://``, ``torchvision://``, ``s3://`` ...) still downloads as
before, but each ``torch.load`` it makes reads through the schema (torch.hub's own default is
``weights_only=False``). Outside the block mmengine keeps its own loaders: nothing changes at
import time. :func:`to_mmengine` rebuilds the message hub's ``HistoryBuffer`` s from the plain
lists the reader returns.

Usage::

    >>> with checkpoint_loading():        # Runner resume / load_from  # doctest: +SKIP
    ...     runner.train()
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from mmengine.runner.checkpoint import CheckpointLoader

from vlp_codebook.checkpoint_io import read_checkpoint, torch_load_as_data, trusting

__all__ = ['load_from_safe_local', 'checkpoint_loading', 'to_mmengine', 'LOCAL_PREFIX', 'is_url']

#: the prefix mmengine matches (as a regular expression) for plain local paths
LOCAL_PREFIX = ''


def to_mmengine(checkpoint: Any) -> Any:
    """``checkpoint`` with its message hub's plain ``{'log', 'count', 'max_length'}`` entries as the
    ``HistoryBuffer`` s mmengine's ``MessageHub.load_state_dict`` expects (in place)."""
    from mmengine.logging import HistoryBuffer

    hub = checkpoint.get('message_hub') if isinstance(checkpoint, dict) else None
    scalars = hub.get('log_scalars') if isinstance(hub, dict) else None
    for key, value in (scalars or {}).items():
        if isinstance(value, dict) and {'log', 'count', 'max_length'} <= set(value):
            scalars[key] = HistoryBuffer(value['log'], value['count'], value['max_length'])
    return checkpoint


def load_from_safe_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's loader interface (``loader(filename, map_location)``) over the schema reader."""
    return to_mmengine(read_checkpoint(filename, map_location=map_location))


def is_url(filename: Any) -> bool:
    """Whether mmengine would load ``filename`` through a scheme (``https://``, ``s3://`` ...), not as a path."""
    return isinstance(filename, str) and any(
        prefix and re.match(prefix, filename) for prefix in CheckpointLoader._schemes)


def _as_data_scheme(loader: Callable) -> Callable:
    """mmengine scheme ``loader`` whose ``torch.load`` calls (its own or torch.hub's, also when the
    schemes call each other) read through the schema while it runs."""
    if getattr(loader, '_vlp_codebook_as_data', False):
        return loader

    def load(filename: str, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        with torch_load_as_data(label=filename):
            return to_mmengine(loader(filename, map_location, *args, **kwargs))

    load._vlp_codebook_as_data = True   # type: ignore[attr-defined]
    load.__wrapped__ = loader   # type: ignore[attr-defined]
    return load


@contextmanager
def checkpoint_loading(trust: Optional[bool] = None) -> Iterator[None]:
    """Within the block, mmengine reads every checkpoint (local or by any scheme) through the schema;
    ``trust=True`` (``--trust-checkpoint``): unpickled freely instead. Blocks nest; the previous
    loaders are restored on exit."""
    previous = dict(CheckpointLoader._schemes)
    CheckpointLoader.register_scheme(prefixes=LOCAL_PREFIX, loader=load_from_safe_local, force=True)
    for prefix, loader in previous.items():
        if prefix != LOCAL_PREFIX:
            CheckpointLoader._schemes[prefix] = _as_data_scheme(loader)
    try:
        with trusting(trust):
            yield
    finally:
        for prefix in list(CheckpointLoader._schemes):
            if prefix in previous:   # one registered inside the block by someone else stays
                CheckpointLoader._schemes[prefix] = previous[prefix]
        if LOCAL_PREFIX not in previous:
            CheckpointLoader._schemes.pop(LOCAL_PREFIX, None)
