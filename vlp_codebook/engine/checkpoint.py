"""Checkpoints are data: every local load is ``torch.load(weights_only=True)`` with a short allow-list.

Why: unpickling a ``.pth`` file can run any code its author put in it (a ``__reduce__`` that
calls ``os.system``). Pretrained checkpoints are downloaded and passed around, so loading one
must not be the same as running a stranger's program. ``torch.load(weights_only=True)`` only
rebuilds tensors, plain containers and the globals explicitly allowed; an mmengine checkpoint
needs a few more, listed in :func:`checkpoint_safe_globals`:

* ``mmengine.logging.HistoryBuffer`` (the message hub's logged scalars) and its statistics
  methods, pickled as ``getattr(HistoryBuffer, 'mean')`` -- allowed through a ``getattr`` that
  answers for exactly those names (the real ``builtins.getattr`` is never allowed);
* numpy arrays, scalars and dtypes (the buffers' history, ``meta`` values).

Everything else (the optimizer and scheduler state, ``meta``, the config text) is plain
containers. A file that needs more is refused with :class:`UntrustedCheckpointError`, which
names the file, the offending types and the opt-in: ``--trust-checkpoint`` on the tools, or the
environment variable ``VLP_CODEBOOK_TRUST_CHECKPOINTS=1`` (then ``weights_only=False``: only for
files you wrote yourself). A truncated or foreign file raises :class:`CorruptCheckpointError`
naming the file and what to do.

Scope: nothing changes at import time. :func:`checkpoint_loading` makes
:func:`load_from_safe_local` mmengine's loader for local paths (the ``''`` prefix of
:class:`mmengine.runner.CheckpointLoader`) for the duration of a ``with`` block and restores the
previous loader afterwards; the train/test/gradcam tools wrap building and running the Runner in
it. Outside it mmengine keeps its own loader (``torch.load`` with torch's default,
``weights_only=True`` since torch 2.6: safe, but it cannot resume an mmengine checkpoint).

Usage::

    >>> from vlp_codebook.engine.checkpoint import checkpoint_loading, load_checkpoint_file
    >>> state = load_checkpoint_file('work_dirs/demo/iter_100.pth', map_location='cpu')  # doctest: +SKIP
    >>> with checkpoint_loading():        # Runner resume / load_from, safely  # doctest: +SKIP
    ...     runner.train()
"""
from __future__ import annotations

import contextvars
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ['TRUST_ENV', 'TRUST_FLAG', 'CheckpointError', 'UntrustedCheckpointError', 'CorruptCheckpointError',
           'trust_requested', 'checkpoint_safe_globals', 'load_checkpoint_file', 'load_from_safe_local',
           'checkpoint_loading', 'allow_listed', 'LOCAL_PREFIX']

#: environment variable that, set to 1/true/yes, lets every load in the process unpickle freely
TRUST_ENV = 'VLP_CODEBOOK_TRUST_CHECKPOINTS'
#: the command-line flag of the tools with the same meaning, for one run
TRUST_FLAG = '--trust-checkpoint'
#: the prefix mmengine matches (as a regular expression) for plain local paths
LOCAL_PREFIX = ''

_TRUE = ('1', 'true', 'yes', 'on')
# set (to True) by ``checkpoint_loading(trust=True)``: loads inside the block are trusted
_TRUST_IN_SCOPE: contextvars.ContextVar[bool] = contextvars.ContextVar('vlp_codebook_trust_checkpoints',
                                                                      default=False)


class CheckpointError(RuntimeError):
    """A checkpoint file could not be loaded; the message names the file and what to do."""


class UntrustedCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The file needs Python objects outside the allow-list to load (it could run code)."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, damaged or not a PyTorch checkpoint at all."""


def trust_requested(trust: Optional[bool] = None) -> bool:
    """Whether to unpickle without the allow-list: ``trust`` if given, else the enclosing
    ``checkpoint_loading(trust=True)`` block or ``VLP_CODEBOOK_TRUST_CHECKPOINTS=1``."""
    if trust is not None:
        return bool(trust)
    return _TRUST_IN_SCOPE.get() or os.environ.get(TRUST_ENV, '').strip().lower() in _TRUE


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as an mmengine checkpoint uses it: a statistics method of ``HistoryBuffer`` only.

    ``HistoryBuffer.__getstate__`` pickles its ``_statistics_methods`` dict, whose values are
    functions (``HistoryBuffer.mean`` ...), as ``getattr(HistoryBuffer, 'mean')``.
    """
    from mmengine.logging import HistoryBuffer

    statistics = {'min', 'max', 'current', 'mean'} | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and isinstance(name, str) and name in statistics and not name.startswith('_'):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f'getattr({getattr(obj, "__name__", type(obj).__name__)}, {name!r}) is '
                                 'not allowed in a checkpoint (only HistoryBuffer statistics methods are)')


def _numpy_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    import numpy as np

    try:  # numpy >= 2 moved numpy.core to numpy._core; checkpoints may name either
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    entries: List[Union[Callable, Tuple[Callable, str]]] = [np.ndarray, np.dtype]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        entries += [(multiarray._reconstruct, f'{module}._reconstruct'), (multiarray.scalar, f'{module}.scalar')]
    dtypes = getattr(np, 'dtypes', None)  # numpy >= 1.25: one class per dtype (Float64DType ...)
    if dtypes is not None:
        for name in dir(dtypes):
            cls = getattr(dtypes, name)
            if isinstance(cls, type) and name.endswith('DType') and name != 'ObjectDType':
                entries.append(cls)
    return entries


def checkpoint_safe_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The globals an mmengine checkpoint written by this project needs beyond torch's defaults.

    Returns entries for :func:`torch.serialization.safe_globals`: a class/function, or a
    ``(replacement, 'module.name')`` pair for a name whose real object is too powerful.
    """
    from mmengine.logging import HistoryBuffer

    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr'),
            (_history_buffer_getattr, '__builtin__.getattr'), *_numpy_globals()]


@contextmanager
def allow_listed() -> Iterator[None]:
    """:func:`checkpoint_safe_globals` added to torch's safe globals for the block.

    Unlike :class:`torch.serialization.safe_globals`, whose exit removes its entries even when an
    enclosing block (or the user's own ``add_safe_globals``) added them too, this removes on exit
    only the entries that were not there before, so blocks nest and what others add meanwhile
    (torch registers some on import) stays.
    """
    before = set(torch.serialization.get_safe_globals())
    added = [entry for entry in checkpoint_safe_globals() if entry not in before]
    torch.serialization.add_safe_globals(added)
    try:
        yield
    finally:
        remaining = [entry for entry in torch.serialization.get_safe_globals() if entry not in set(added)]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(remaining)


_UNSAFE_GLOBAL = re.compile(r'GLOBAL (\S+) was not an allowed global')
_CORRUPT_RUNTIME = ('PytorchStreamReader', 'zip archive', 'central directory', 'file not found in archive')


def _offending_globals(path: str, error: BaseException) -> List[str]:
    """Names of the disallowed globals in ``path`` (all of them when torch can list them)."""
    allowed = set(names_of(checkpoint_safe_globals()))
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # old (non-zip) format, or unreadable: fall back on the error message
        names = _UNSAFE_GLOBAL.findall(str(error))
    names = [n for n in names if n not in allowed]
    return names or _UNSAFE_GLOBAL.findall(str(error))


def _what_to_do(what: str) -> str:
    return (f'If you wrote this file yourself (or trust whoever did), load it anyway with {TRUST_FLAG} '
            f'(train/test/gradcam/convert_albef) or the environment variable {TRUST_ENV}=1; '
            f'unpickling then runs whatever code the file holds. See docs/security.md.')


def _resolve(filename: Union[str, os.PathLike], what: str) -> str:
    path = os.path.abspath(os.path.expanduser(os.fspath(filename)))
    if not os.path.isfile(path):
        where = 'is a directory, not a file' if os.path.isdir(path) else 'does not exist'
        raise FileNotFoundError(f'{what} {os.fspath(filename)!r} {where} (resolved path: {path})')
    return path


def load_checkpoint_file(filename: Union[str, os.PathLike], map_location: Any = None,
                         trust: Optional[bool] = None, what: str = 'checkpoint') -> Any:
    """``torch.load`` of a local file, as data unless trust was asked for.

    Args:
        filename: the file; ``~`` is expanded.
        map_location: as in :func:`torch.load` (``'cpu'``, a device, or a callable).
        trust: True: unpickle anything (``weights_only=False``); False: never; None (default):
            see :func:`trust_requested`.
        what: how the file is called in messages (``'checkpoint'``, ``'pretrained'``...).

    Returns:
        Whatever was saved: for mmengine checkpoints a dict with ``meta``, ``state_dict``,
        ``message_hub``, ``optimizer``, ``param_schedulers``.

    Raises:
        FileNotFoundError: no file there (the message names the resolved path).
        UntrustedCheckpointError: the file needs types outside :func:`checkpoint_safe_globals`.
        CorruptCheckpointError: the file is truncated, damaged or not a torch checkpoint.
    """
    path = _resolve(filename, what)
    trusted = trust_requested(trust)
    try:
        if trusted:
            return torch.load(path, map_location=map_location, weights_only=False)
        with allow_listed():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if not trusted and 'Weights only load failed' in str(error):
            names = _offending_globals(path, error)
            if not names:   # no foreign type: a pickle the safe unpickler cannot parse
                raise _corrupt(path, what, error, _weights_only_reason(error)) from None
            raise UntrustedCheckpointError(
                f'refusing to unpickle {what} {path}: it needs {len(names)} type(s) outside the allow-list: '
                f'{", ".join(names)}. A checkpoint is loaded as data '
                f'(torch.load weights_only=True with the types mmengine checkpoints need); loading this '
                f'one would let the file run code. {_what_to_do(what)}') from None
        raise _corrupt(path, what, error) from error
    except (EOFError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise _corrupt(path, what, error) from error
    except OSError as error:   # torch's zip reader on a truncated archive: "[Errno 22] Invalid argument"
        if isinstance(error, (PermissionError, FileNotFoundError)):
            raise
        raise _corrupt(path, what, error) from error
    except RuntimeError as error:
        if any(marker in str(error) for marker in _CORRUPT_RUNTIME):
            raise _corrupt(path, what, error) from error
        raise


def _weights_only_reason(error: BaseException) -> str:
    """The one line of torch's weights-only refusal that says what it met."""
    text = str(error)
    after = text.split('WeightsUnpickler error:', 1)[-1].strip()
    return after.splitlines()[0][:200] if after else text.splitlines()[0][:200]


def _corrupt(path: str, what: str, error: BaseException, reason: Optional[str] = None) -> CorruptCheckpointError:
    size = os.path.getsize(path)
    if reason is None:
        reason = str(error).splitlines()[0][:200] if str(error) else '(no message)'
    return CorruptCheckpointError(
        f'{what} {path} ({size} bytes) is not a readable PyTorch checkpoint: {type(error).__name__}: {reason}. '
        'The file is truncated (an interrupted download or copy, a full disk), damaged, or not a '
        'torch.save file at all (safetensors, an archive, a Git LFS pointer). Download or copy it '
        f'again, or train again to write a new one. (If it is intact, written by you with pickle features '
        f'the safe loader does not read, {TRUST_FLAG} / {TRUST_ENV}=1 loads it: see docs/security.md.)')


def load_from_safe_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's loader interface (``loader(filename, map_location)``) over :func:`load_checkpoint_file`."""
    return load_checkpoint_file(filename, map_location=map_location)


@contextmanager
def checkpoint_loading(trust: Optional[bool] = None) -> Iterator[None]:
    """Within the block, mmengine loads local checkpoints through :func:`load_from_safe_local`.

    Args:
        trust: True: the loads in the block unpickle anything (the ``--trust-checkpoint`` flag);
            None/False: as :func:`trust_requested` says (the environment variable).

    The previous loader for local paths is restored on exit, so nothing outside the block
    (another library's mmengine Runner in the same process) changes. Blocks nest. URL schemes keep
    mmengine's loaders (``torch.load`` with torch's default ``weights_only=True``), with the
    allow-list added for the block; ``trust`` does not apply to them.
    """
    previous = CheckpointLoader._schemes.get(LOCAL_PREFIX)
    token = _TRUST_IN_SCOPE.set(bool(trust) or _TRUST_IN_SCOPE.get())
    CheckpointLoader.register_scheme(prefixes=LOCAL_PREFIX, loader=load_from_safe_local, force=True)
    try:
        # mmengine's URL loaders (https://, s3://) call torch.load with torch's default
        # (weights_only=True): the allow-list lets them read an mmengine checkpoint too
        with allow_listed():
            yield
    finally:
        _TRUST_IN_SCOPE.reset(token)
        if previous is None:
            CheckpointLoader._schemes.pop(LOCAL_PREFIX, None)
        else:
            CheckpointLoader.register_scheme(prefixes=LOCAL_PREFIX, loader=previous, force=True)


def names_of(entries: Sequence[Union[Callable, Tuple[Callable, str]]]) -> List[str]:
    """The pickled names of :func:`checkpoint_safe_globals` entries (for docs and tests)."""
    return [e[1] if isinstance(e, tuple) else f'{e.__module__}.{e.__qualname__}' for e in entries]
