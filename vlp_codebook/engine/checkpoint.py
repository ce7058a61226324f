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

What the allow-list lets in is checked as it is rebuilt, so a file cannot use it to exhaust memory
or smuggle objects: a ``HistoryBuffer`` holds at most :data:`MAX_HISTORY_LENGTH` plain numbers
(anything else is refused before numpy sees it), numpy dtypes and arrays never hold Python objects
(object dtypes are refused), and an array is rebuilt only from its own bytes.

Scope: nothing changes at import time. :func:`checkpoint_loading` makes
:func:`load_from_safe_local` mmengine's loader for local paths (the ``''`` prefix of
:class:`mmengine.runner.CheckpointLoader`) for the duration of a ``with`` block and restores the
previous loader afterwards; the train/test/gradcam tools wrap building and running the Runner in
it. Every other scheme mmengine's ``CheckpointLoader`` knows (``http(s)://``, ``torchvision://``,
``mmcls://``, ``open-mmlab://``, ``s3://`` ...) is wrapped for the block too: its download or
cache lookup runs as before, and every ``torch.load`` it makes is replaced by the same data-only
load (torch.hub's ``load_state_dict_from_url`` defaults to ``weights_only=False``). Outside the
block mmengine keeps its own loaders.

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
           'checkpoint_loading', 'allow_listed', 'LOCAL_PREFIX', 'MAX_HISTORY_LENGTH', 'is_url']

#: environment variable that, set to 1/true/yes, lets every load in the process unpickle freely
TRUST_ENV = 'VLP_CODEBOOK_TRUST_CHECKPOINTS'
#: the command-line flag of the tools with the same meaning, for one run
TRUST_FLAG = '--trust-checkpoint'
#: the prefix mmengine matches (as a regular expression) for plain local paths
LOCAL_PREFIX = ''
#: most values a logged-scalar history (``HistoryBuffer``) may hold in a checkpoint (mmengine's default
#: ``max_length``)
MAX_HISTORY_LENGTH = 1_000_000

_TRUE = ('1', 'true', 'yes', 'on')
# set (to True) by ``checkpoint_loading(trust=True)``: loads inside the block are trusted
_TRUST_IN_SCOPE: contextvars.ContextVar[bool] = contextvars.ContextVar('vlp_codebook_trust_checkpoints',
                                                                      default=False)
# why the last refusal of checkpoint contents happened (torch re-raises our UnpicklingError as its own)
_REFUSAL: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar('vlp_codebook_refusal', default=None)


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


def _refuse(reason: str) -> pickle.UnpicklingError:
    """An unpickling error for contents the allow-list admits by type but not by value."""
    _REFUSAL.set(reason)
    return pickle.UnpicklingError(reason)


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as an mmengine checkpoint uses it: a statistics method of ``HistoryBuffer`` only.

    ``HistoryBuffer.__getstate__`` pickles its ``_statistics_methods`` dict, whose values are
    functions (``HistoryBuffer.mean`` ...), as ``getattr(HistoryBuffer, 'mean')``.
    """
    from mmengine.logging import HistoryBuffer

    statistics = {'min', 'max', 'current', 'mean'} | set(HistoryBuffer._statistics_methods)
    if obj in (HistoryBuffer, _checked_history_buffer()) and isinstance(name, str) and name in statistics \
            and not name.startswith('_'):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f'getattr({getattr(obj, "__name__", type(obj).__name__)}, {name!r}) is '
                                 'not allowed in a checkpoint (only HistoryBuffer statistics methods are)')


def _check_history(values: Any, field: str) -> None:
    """``values`` (a HistoryBuffer's log or count history) must be at most MAX_HISTORY_LENGTH plain
    numbers: a flat list/tuple of int/float, or a 1-D numeric numpy array. Checked without
    converting it, so a nested structure of shared references is never expanded."""
    import numpy as np

    what = f'a HistoryBuffer (logged scalars) in it has {field}'
    if isinstance(values, np.ndarray):
        if values.dtype.hasobject or values.dtype.kind not in 'biuf':
            raise _refuse(f'{what} of dtype {values.dtype}; only numbers belong there')
        if values.ndim != 1 or values.size > MAX_HISTORY_LENGTH:
            raise _refuse(f'{what} of shape {values.shape}; expected a flat array of at most '
                          f'{MAX_HISTORY_LENGTH} numbers')
        return
    if type(values) not in (list, tuple):
        raise _refuse(f'{what} of type {type(values).__name__}; expected a flat list or array of numbers')
    if len(values) > MAX_HISTORY_LENGTH:
        raise _refuse(f'{what} with {len(values)} values; at most {MAX_HISTORY_LENGTH} are allowed')
    for index, value in enumerate(values):
        if type(value) not in (int, float) and not isinstance(value, (np.integer, np.floating)):
            raise _refuse(f'{what} with a {type(value).__name__} at index {index}; only plain numbers are '
                          'allowed there (numpy would expand a nested list)')


def _check_max_length(max_length: Any) -> None:
    if type(max_length) is not int or max_length < 1:
        raise _refuse(f'a HistoryBuffer (logged scalars) in it has max_length={max_length!r:.40}; '
                      'expected a positive int')


_CHECKED_HISTORY_BUFFER: Optional[type] = None
_HISTORY_FIELDS = ('max_length', '_log_history', '_count_history', '_statistics_methods', 'statistics_methods')


def _checked_history_buffer() -> type:
    """What the name ``mmengine.logging.history_buffer.HistoryBuffer`` means inside a checkpoint.

    A subclass of mmengine's ``HistoryBuffer`` whose construction (``HistoryBuffer(log, counts,
    max_length)``) and ``__setstate__`` check their input first (:func:`_check_history`), then
    do what the original does and turn the object into a plain ``HistoryBuffer`` (so nothing of
    this class outlives the load, and a checkpoint saved afterwards names mmengine's class).
    """
    global _CHECKED_HISTORY_BUFFER
    if _CHECKED_HISTORY_BUFFER is not None:
        return _CHECKED_HISTORY_BUFFER
    from mmengine.logging import HistoryBuffer

    def check_methods(methods: Any, field: str) -> None:
        allowed = {getattr(HistoryBuffer, n) for n in ('min', 'max', 'current', 'mean')}
        allowed |= set(HistoryBuffer._statistics_methods.values())
        if type(methods) is not dict or any(type(k) is not str or v not in allowed for k, v in methods.items()):
            raise _refuse(f'a HistoryBuffer (logged scalars) in it has {field} that are not its statistics methods')

    class CheckedHistoryBuffer(HistoryBuffer):
        def __init__(self, log_history: Sequence = (), count_history: Sequence = (),
                     max_length: int = MAX_HISTORY_LENGTH):
            _check_history(log_history, 'log_history')
            _check_history(count_history, 'count_history')
            _check_max_length(max_length)
            super().__init__(list(log_history), list(count_history), max_length)
            self.__class__ = HistoryBuffer

        def __setstate__(self, state: Any) -> None:
            if type(state) is not dict:
                raise _refuse(f'a HistoryBuffer (logged scalars) in it has a state of type {type(state).__name__}')
            unknown = sorted(str(k)[:40] for k in state if k not in _HISTORY_FIELDS)
            if unknown:
                raise _refuse(f'a HistoryBuffer (logged scalars) in it has unknown fields {unknown[:5]}')
            for field in ('_log_history', '_count_history'):
                _check_history(state.get(field, ()), field)
            _check_max_length(state.get('max_length', MAX_HISTORY_LENGTH))
            for field in ('_statistics_methods', 'statistics_methods'):
                check_methods(state.get(field, {}), field)
            super().__setstate__(state)
            self.__class__ = HistoryBuffer

    CheckedHistoryBuffer.__module__ = __name__
    _CHECKED_HISTORY_BUFFER = CheckedHistoryBuffer
    return CheckedHistoryBuffer


def _checked_dtype(*args: Any) -> Any:
    """``numpy.dtype(...)`` as a checkpoint may call it: never one that holds Python objects."""
    import numpy as np

    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise _refuse(f'a numpy dtype {args[0] if args else ""!r:.40} in it holds Python objects (object dtypes '
                      'are not loaded: they could hold anything)')
    return dtype


def _multiarray() -> Any:
    try:  # numpy >= 2 moved numpy.core to numpy._core; checkpoints may name either
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _checked_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's ``_reconstruct`` as ``ndarray.__reduce__`` calls it: an empty ndarray that the pickle
    then fills from its own bytes (never an allocation whose size the file chooses)."""
    import numpy as np

    if subtype is not np.ndarray or shape != (0,) or dtype not in (b'b', 'b'):
        raise _refuse(f'a numpy array rebuilt as _reconstruct({getattr(subtype, "__name__", "?")}, '
                      f'{shape!r:.60}, {dtype!r:.20}); numpy writes _reconstruct(ndarray, (0,), b"b")')
    return _multiarray()._reconstruct(subtype, shape, dtype)


def _numpy_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    import numpy as np

    multiarray = _multiarray()
    entries: List[Union[Callable, Tuple[Callable, str]]] = [np.ndarray, (_checked_dtype, 'numpy.dtype')]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        entries += [(_checked_reconstruct, f'{module}._reconstruct'), (multiarray.scalar, f'{module}.scalar')]
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
    return [(_checked_history_buffer(), 'mmengine.logging.history_buffer.HistoryBuffer'),
            (_history_buffer_getattr, 'builtins.getattr'),
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
        UntrustedCheckpointError: the file needs types outside :func:`checkpoint_safe_globals`,
            or holds allowed types with contents they never have (an object dtype, a
            ``HistoryBuffer`` that is not a flat list of numbers).
        CorruptCheckpointError: the file is truncated, damaged or not a torch checkpoint.
    """
    path = _resolve(filename, what)
    return _load_as_data(torch.load, path, map_location, trust_requested(trust), what, path)


def _load_as_data(real_load: Callable, source: Any, map_location: Any, trusted: bool, what: str,
                  label: str, **kwargs: Any) -> Any:
    """``real_load`` (``torch.load``) of ``source`` (a path or a file object), weights-only with the
    allow-list unless ``trusted``; errors name ``label`` (the path, or the URL and its cache file)."""
    path = source if isinstance(source, str) else None
    kwargs.pop('weights_only', None)
    token = _REFUSAL.set(None)
    try:
        if trusted:
            return real_load(source, map_location=map_location, weights_only=False, **kwargs)
        with allow_listed():
            loaded = real_load(source, map_location=map_location, weights_only=True, **kwargs)
        _refuse_objects(loaded)
        return loaded
    except pickle.UnpicklingError as error:
        refusal = _REFUSAL.get()
        if refusal is not None and not trusted:
            raise UntrustedCheckpointError(
                f'refusing to load {what} {label}: {refusal}. A checkpoint written by mmengine holds nothing '
                f'like that; this one may have been made to exhaust memory or to smuggle objects in. '
                f'{_what_to_do(what)}') from None
        if not trusted and 'Weights only load failed' in str(error):
            names = _offending_globals(path, error) if path else _UNSAFE_GLOBAL.findall(str(error))
            if not names:   # no foreign type: a pickle the safe unpickler cannot parse
                raise _corrupt(label, what, error, _weights_only_reason(error), path) from None
            raise UntrustedCheckpointError(
                f'refusing to unpickle {what} {label}: it needs {len(names)} type(s) outside the allow-list: '
                f'{", ".join(names)}. A checkpoint is loaded as data '
                f'(torch.load weights_only=True with the types mmengine checkpoints need); loading this '
                f'one would let the file run code. {_what_to_do(what)}') from None
        raise _corrupt(label, what, error, path=path) from error
    except (EOFError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise _corrupt(label, what, error, path=path) from error
    except OSError as error:   # torch's zip reader on a truncated archive: "[Errno 22] Invalid argument"
        if isinstance(error, (PermissionError, FileNotFoundError)):
            raise
        raise _corrupt(label, what, error, path=path) from error
    except RuntimeError as error:
        if any(marker in str(error) for marker in _CORRUPT_RUNTIME):
            raise _corrupt(label, what, error, path=path) from error
        raise
    finally:
        _REFUSAL.reset(token)


def _refuse_objects(loaded: Any) -> None:
    """Refuse numpy values of an object dtype anywhere in what was loaded (whatever route built them)."""
    import numpy as np

    seen = set()
    stack = [loaded]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (torch.Tensor, str, bytes, int, float)):
            continue
        seen.add(id(item))
        if isinstance(item, (np.ndarray, np.generic, np.dtype)):
            dtype = item if isinstance(item, np.dtype) else item.dtype
            if dtype.hasobject:
                raise _refuse(f'a numpy value in it has dtype {dtype}, which holds Python objects (object dtypes '
                              'are not loaded: they could hold anything)')
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, '__dict__'):
            stack.extend(vars(item).values())


def _weights_only_reason(error: BaseException) -> str:
    """The one line of torch's weights-only refusal that says what it met."""
    text = str(error)
    after = text.split('WeightsUnpickler error:', 1)[-1].strip()
    return after.splitlines()[0][:200] if after else text.splitlines()[0][:200]


def _corrupt(label: str, what: str, error: BaseException, reason: Optional[str] = None,
             path: Optional[str] = None) -> CorruptCheckpointError:
    size = f' ({os.path.getsize(path)} bytes)' if path and os.path.isfile(path) else ''
    if reason is None:
        reason = str(error).splitlines()[0][:200] if str(error) else '(no message)'
    return CorruptCheckpointError(
        f'{what} {label}{size} is not a readable PyTorch checkpoint: {type(error).__name__}: {reason}. '
        'The file is truncated (an interrupted download or copy, a full disk), damaged, or not a '
        'torch.save file at all (safetensors, an archive, a Git LFS pointer). Download or copy it '
        f'again, or train again to write a new one. (If it is intact, written by you with pickle features '
        f'the safe loader does not read, {TRUST_FLAG} / {TRUST_ENV}=1 loads it: see docs/security.md.)')


def load_from_safe_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's loader interface (``loader(filename, map_location)``) over :func:`load_checkpoint_file`."""
    return load_checkpoint_file(filename, map_location=map_location)


def is_url(filename: Any) -> bool:
    """Whether mmengine would load ``filename`` through a scheme (``https://``, ``s3://`` ...), not as a path."""
    return isinstance(filename, str) and any(
        prefix and re.match(prefix, filename) for prefix in CheckpointLoader._schemes)


def _as_data_scheme(loader: Callable) -> Callable:
    """mmengine scheme ``loader`` (``loader(filename, map_location)``) whose ``torch.load`` calls load
    as data: it downloads or finds the file as before; unpickling goes through :func:`_load_as_data`.

    ``torch.load`` is replaced while the loader runs because mmengine's loaders call it (or
    ``torch.hub.load_state_dict_from_url``, whose ``weights_only`` defaults to False) from inside
    their own code, and call each other (``torchvision://`` and ``mmcls://`` end in mmengine's
    ``http://`` loader directly, not through the scheme table).
    """
    if getattr(loader, '_vlp_codebook_as_data', False):
        return loader

    def load(filename: str, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        real_load = torch.load
        trusted = trust_requested()

        def load_as_data(source: Any, map_location: Any = None, *load_args: Any, **load_kwargs: Any) -> Any:
            if load_args:   # torch.load(f, map_location, pickle_module, ...) positionally: keep as is
                load_kwargs = dict(zip(('pickle_module',), load_args), **load_kwargs)
            load_kwargs.pop('pickle_module', None)
            label = filename if not isinstance(source, str) or source == filename else f'{filename} ({source})'
            return _load_as_data(real_load, source, map_location, trusted, 'checkpoint', label, **load_kwargs)

        torch.load = load_as_data
        try:
            return loader(filename, map_location, *args, **kwargs)
        finally:
            torch.load = real_load

    load._vlp_codebook_as_data = True   # type: ignore[attr-defined]
    load.__wrapped__ = loader   # type: ignore[attr-defined]
    load.__doc__ = f'{getattr(loader, "__name__", "loader")}, loading as data (vlp_codebook checkpoint_loading)'
    return load


@contextmanager
def checkpoint_loading(trust: Optional[bool] = None) -> Iterator[None]:
    """Within the block, mmengine loads every checkpoint as data: local paths through
    :func:`load_from_safe_local`, every other registered scheme (``http(s)://``, ``torchvision://``,
    ``mmcls://``, ``open-mmlab://``, ``s3://``, ``pavi://`` ...) through :func:`_as_data_scheme`.

    Args:
        trust: True: the loads in the block unpickle anything (the ``--trust-checkpoint`` flag);
            None/False: as :func:`trust_requested` says (the environment variable).

    The previous loaders are restored on exit, so nothing outside the block (another library's
    mmengine Runner in the same process) changes. Blocks nest.
    """
    previous = dict(CheckpointLoader._schemes)
    token = _TRUST_IN_SCOPE.set(bool(trust) or _TRUST_IN_SCOPE.get())
    CheckpointLoader.register_scheme(prefixes=LOCAL_PREFIX, loader=load_from_safe_local, force=True)
    for prefix, loader in previous.items():
        if prefix != LOCAL_PREFIX:
            CheckpointLoader._schemes[prefix] = _as_data_scheme(loader)
    try:
        with allow_listed():
            yield
    finally:
        _TRUST_IN_SCOPE.reset(token)
        for prefix in list(CheckpointLoader._schemes):
            if prefix not in previous:   # registered inside the block by someone else: keep it
                continue
            CheckpointLoader._schemes[prefix] = previous[prefix]
        if LOCAL_PREFIX not in previous:
            CheckpointLoader._schemes.pop(LOCAL_PREFIX, None)


def names_of(entries: Sequence[Union[Callable, Tuple[Callable, str]]]) -> List[str]:
    """The pickled names of :func:`checkpoint_safe_globals` entries (for docs and tests)."""
    return [e[1] if isinstance(e, tuple) else f'{e.__module__}.{e.__qualname__}' for e in entries]
