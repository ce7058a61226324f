"""Local checkpoint loading that works on torch >= 2.6 (resume, ``load_from``, the test tool).

Why: since torch 2.6 ``torch.load`` defaults to ``weights_only=True``, which refuses any
pickled Python object that is not a tensor or a plain container. mmengine 0.10.7's local loader
(``mmengine.runner.checkpoint.load_from_local``) calls ``torch.load(filename, map_location)``
without the argument, and an mmengine checkpoint *does* hold pickled objects: the message hub
state (``HistoryBuffer`` objects, the logged scalars), the optimizer and parameter-scheduler
state, the config text and numpy values in ``meta``. So ``runner.resume`` fails with
``_pickle.UnpicklingError: Weights only load failed``.

What: :func:`load_from_trusted_local` replaces mmengine's loader for local paths (the ``''``
prefix of :class:`mmengine.runner.CheckpointLoader`, the fallback for every path without a
URL scheme such as ``https://`` or ``s3://``; those other schemes keep mmengine's loaders). It
calls ``torch.load(path, map_location=..., weights_only=False)``.

Security: ``weights_only=False`` unpickles, and unpickling can run arbitrary code. Load only
checkpoints you (or someone you trust) wrote -- the same trust you give a Python file you run.

It is registered when :mod:`vlp_codebook.engine` is imported; the train/test tools import it
before building the Runner. Registering again is harmless::

    >>> import vlp_codebook.engine  # registers the loader
    >>> from mmengine.runner import CheckpointLoader
    >>> CheckpointLoader._get_checkpoint_loader('work_dirs/demo/iter_100.pth').__name__
    'load_from_trusted_local'
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ['load_from_trusted_local', 'register_checkpoint_loader', 'LOCAL_PREFIX']

#: the prefix mmengine matches (as a regular expression) for plain local paths
LOCAL_PREFIX = ''


def load_from_trusted_local(filename: str, map_location: Optional[Union[str, torch.device, Callable]] = None
                            ) -> Any:
    """Load the (trusted) local checkpoint ``filename`` with ``weights_only=False``.

    Args:
        filename: path of the checkpoint; ``~`` is expanded.
        map_location: as in :func:`torch.load` (``'cpu'``, a device, or a callable).

    Returns:
        Whatever was saved: for mmengine checkpoints a dict with ``meta``, ``state_dict``,
        ``message_hub``, ``optimizer``, ``param_schedulers``.

    Raises:
        FileNotFoundError: no file at ``filename`` (the message names the resolved path).
    """
    path = os.path.abspath(os.path.expanduser(filename))
    if not os.path.isfile(path):
        where = 'is a directory, not a file' if os.path.isdir(path) else 'does not exist'
        raise FileNotFoundError(f'checkpoint {filename!r} {where} (resolved path: {path})')
    # mmengine checkpoints hold pickled objects (message hub, optimizer state): see module doc
    return torch.load(path, map_location=map_location, weights_only=False)


def register_checkpoint_loader() -> None:
    """Make :func:`load_from_trusted_local` mmengine's loader for local paths (idempotent)."""
    CheckpointLoader.register_scheme(prefixes=LOCAL_PREFIX, loader=load_from_trusted_local, force=True)


register_checkpoint_loader()
