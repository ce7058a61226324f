"""Checkpoints are read against a schema: nothing in a file is run, imported, deleted or blown up.

A ``.pth`` file is a zip archive holding a pickle and raw tensor bytes. Unpickling can run any
code its author put in it, and even plain data can be built to take far more memory or time than
its size. :func:`read_checkpoint` reads what a checkpoint of this project *is*, and refuses the
rest before it is built (docs/security.md has the cases):

* the archive: members stored uncompressed, exactly one ``data.pkl``;
* the pickle, scanned first: only the globals our files name (:data:`SCHEMA_GLOBALS`: ordered
  dicts, dense tensors and their storages, dtypes, devices, sizes; a subset of what torch's
  ``weights_only=True`` accepts, which then builds them); no integer beyond 2**61 (such dict
  keys collide at will); ``numpy``,
  ``mmengine`` and ``getattr`` globals become inert placeholders and their entries are dropped,
  with one line saying so;
* the objects, walked once: dict, list, tuple, str, numbers, None, dense tensors (storage at least
  their own elements: no zero strides); no container reachable twice but small lists of plain
  values; depth at most :data:`MAX_DEPTH`;
* mmengine's ``meta`` and ``message_hub`` (:func:`conform_mmengine`): plain known keys only; the
  config text is never executed, logged scalars are plain lists of at most :data:`MAX_HISTORY`
  numbers, and no path or step number is kept to delete anything by.

Anything else raises :class:`UntrustedCheckpointError` naming the file, what was found and the
opt-in (``--trust-checkpoint`` / ``VLP_CODEBOOK_TRUST_CHECKPOINTS=1``: ``weights_only=False``, for
files you wrote yourself); a damaged file :class:`CorruptCheckpointError`. Ground floor (imports
only torch): models and plugins read weights without importing the engine.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import os
import pickle
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

__all__ = ['TRUST_ENV', 'TRUST_FLAG', 'MAX_HISTORY', 'MAX_DEPTH', 'SCHEMA_GLOBALS', 'CheckpointError', 'UntrustedCheckpointError',
           'CorruptCheckpointError', 'trust_requested', 'trusting', 'read_checkpoint', 'torch_load_as_data',
           'conform_mmengine']

TRUST_ENV = 'VLP_CODEBOOK_TRUST_CHECKPOINTS'
TRUST_FLAG = '--trust-checkpoint'
#: most numbers one logged scalar's history may hold (mmengine's default ``max_length``)
MAX_HISTORY = 1_000_000
#: deepest nesting of containers a checkpoint may have
MAX_DEPTH = 64
_MAX_INT = 2 ** 61          # Python hashes an int modulo 2**61 - 1: larger ones collide at will
_FOREIGN = ('numpy.', 'mmengine.', 'builtins.getattr')
_DENSE = (('Double', 'float64'), ('Float', 'float32'), ('Half', 'float16'), ('BFloat16', 'bfloat16'),
          ('Long', 'int64'), ('Int', 'int32'), ('Short', 'int16'), ('Char', 'int8'), ('Byte', 'uint8'),
          ('Bool', 'bool'), ('ComplexDouble', 'complex128'), ('ComplexFloat', 'complex64'))
#: every global a checkpoint of this project names: containers, the dense-tensor rebuilders and the
#: storages of dense dtypes (torch.save's names), dtypes, devices, sizes, and the byte-string codec
#: of pickle protocol 2. Not sparse, quantized, nested or meta tensors, tensor subclasses, sets.
SCHEMA_GLOBALS = frozenset({
    'collections.OrderedDict', 'torch._utils._rebuild_tensor_v2', 'torch._utils._rebuild_parameter',
    'torch.device', 'torch.Size', '_codecs.encode',
    *(f'torch.{storage}Storage' for storage, _ in _DENSE), *(f'torch.{dtype}' for _, dtype in _DENSE)})
_META_KEYS = ('epoch', 'iter', 'cfg', 'seed', 'experiment_name', 'time', 'mmengine_version', 'dataset_meta')
_INFO_KEYS = ('epoch', 'iter', 'max_epochs', 'max_iters', 'loop_stage', 'seed', 'experiment_name',
              'mmengine_version', 'cfg', 'eta', 'best_score')
_QUIET = ('last_ckpt', 'keep_ckpt_ids', 'best_ckpt')   # paths and ids: recomputed from the work dir
_ATOMS = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)
_TRUST_IN_SCOPE: contextvars.ContextVar[bool] = contextvars.ContextVar('vlp_codebook_trust', default=False)


class CheckpointError(RuntimeError):
    """A checkpoint file could not be loaded; the message names the file and what to do."""


class UntrustedCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The file holds something a checkpoint of this project does not (code, or a bomb)."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, damaged or not a PyTorch checkpoint at all."""


def trust_requested(trust: Optional[bool] = None) -> bool:
    """``trust`` if given, else a :func:`trusting` block or ``VLP_CODEBOOK_TRUST_CHECKPOINTS=1``."""
    if trust is not None:
        return bool(trust)
    return _TRUST_IN_SCOPE.get() or os.environ.get(TRUST_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on')


@contextlib.contextmanager
def trusting(trust: Optional[bool]) -> Iterator[None]:
    """Within the block, loads unpickle freely if ``trust`` (the ``--trust-checkpoint`` flag)."""
    token = _TRUST_IN_SCOPE.set(bool(trust) or _TRUST_IN_SCOPE.get())
    try:
        yield
    finally:
        _TRUST_IN_SCOPE.reset(token)


def _opt_in() -> str:
    return (f'If you wrote this file yourself (or trust whoever did), load it anyway with {TRUST_FLAG} '
            f'(train/test/gradcam/convert_albef/plot) or the environment variable {TRUST_ENV}=1; '
            'unpickling then runs whatever code the file holds. See docs/security.md.')


def _untrusted(what: str, label: str, found: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(f'refusing to load {what} {label}: {found}. A checkpoint holds tensors and '
                                    f'plain data only; this one could run code or exhaust memory. {_opt_in()}')


def _corrupt(what: str, label: str, error: Any, size: Optional[int] = None) -> CorruptCheckpointError:
    reason = error if isinstance(error, str) else f'{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ""}'
    size_note = f' ({size} bytes)' if size is not None else ''
    return CorruptCheckpointError(
        f'{what} {label}{size_note} is not a readable PyTorch checkpoint: {reason}. The file is truncated (an '
        'interrupted download or copy, a full disk), damaged, or not a torch.save file at all (safetensors, an '
        'archive, a Git LFS pointer, a torch < 1.6 file). Download or copy it again, or train again to write a new '
        f'one. (If it is intact and written by you, {TRUST_FLAG} / {TRUST_ENV}=1 loads it: see docs/security.md.)')


class _Dropped:
    """What a numpy / mmengine / getattr global means inside a checkpoint: nothing. Takes any
    arguments and state, keeps none, runs nothing; the entry holding it is dropped."""
    name = '?'

    def __new__(cls, *args: Any, **kwargs: Any) -> '_Dropped':
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _scan_pickle(data: bytes, what: str, label: str) -> List[str]:
    """The pickle's global names, checked before anything is built: refused when they are not in
    :data:`SCHEMA_GLOBALS` and not ours to drop, or when an integer is large enough to collide."""
    names: List[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == 'GLOBAL':   # named as torch's unpickler names it (Python 2 names mapped)
                module, name = arg.split(' ', 1)
                module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
                names.append(f'{module}.{name}')
            elif isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) >= _MAX_INT \
                    and opcode.name in ('INT', 'LONG', 'LONG1', 'LONG4'):
                raise _untrusted(what, label, f'an integer of {arg.bit_length()} bits (integers that large '
                                 'can be made to collide as dictionary keys, making the load take minutes)')
    except ValueError as error:
        raise _corrupt(what, label, error) from None
    foreign = sorted({n for n in names if n not in SCHEMA_GLOBALS and not n.startswith(_FOREIGN)})
    if foreign:
        raise _untrusted(what, label, f'it needs {len(foreign)} type(s) no checkpoint of this project holds: '
                         f'{", ".join(foreign)}')
    return sorted({n for n in names if n.startswith(_FOREIGN)})


def _read_archive(handle: Any, what: str, label: str, size: Optional[int]) -> bytes:
    """``data.pkl`` of the zip archive ``handle``; a compressed member is refused."""
    try:
        with zipfile.ZipFile(handle) as archive:
            members = archive.infolist()
            packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED
                      or m.compress_size != m.file_size]
            if packed:
                raise _untrusted(what, label, f'compressed archive member {packed[0]!r} ({len(packed)} in all; '
                                 'torch.save stores members uncompressed, a compressed one can expand without bound)')
            names = [m.filename for m in members]
            pickles = [n for n in names if n.rsplit('/', 1)[-1] == 'data.pkl']
            if len(set(names)) != len(names) or len(pickles) > 1:   # so that torch reads the pickle scanned here
                raise _untrusted(what, label, f'an archive with {len(pickles)} data.pkl members or repeated names')
            if not pickles or pickles[0] != f'{names[0].split("/", 1)[0]}/data.pkl':
                raise _corrupt(what, label, 'a zip archive without data.pkl beside its first member', size)
            return archive.read(pickles[0])
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        if isinstance(error, (PermissionError, FileNotFoundError)):
            raise
        raise _corrupt(what, label, error, size) from None


def read_checkpoint(source: Union[str, os.PathLike, io.IOBase], map_location: Any = None,
                    trust: Optional[bool] = None, what: str = 'checkpoint', label: Optional[str] = None) -> Any:
    """Read a checkpoint (a local path or an open binary file) against the schema (module docstring).

    Args:
        source: the file; ``~`` is expanded.
        map_location: as in :func:`torch.load`.
        trust: True: ``torch.load(weights_only=False)``, no schema; None: :func:`trust_requested`.
        what, label: how the file is called in messages (default ``checkpoint`` and its path).

    Returns:
        What was saved, less the dropped entries (said in one printed line); an mmengine
        checkpoint also passes :func:`conform_mmengine`.

    Raises:
        FileNotFoundError, UntrustedCheckpointError, CorruptCheckpointError: named in the message.
    """
    size = None
    if isinstance(source, (str, os.PathLike)):
        source = os.path.abspath(os.path.expanduser(os.fspath(source)))
        if not os.path.isfile(source):
            where = 'is a directory, not a file' if os.path.isdir(source) else 'does not exist'
            raise FileNotFoundError(f'{what} {label or source!r} {where} (resolved path: {source})')
        size = os.path.getsize(source)
    label = label or (source if isinstance(source, str) else getattr(source, 'name', '(a file object)'))
    trusted = trust_requested(trust)
    with (open(source, 'rb') if isinstance(source, str) else contextlib.nullcontext(source)) as handle:
        placeholders = []
        if not trusted:
            start = handle.tell()
            dropped = _scan_pickle(_read_archive(handle, what, label, size), what, label)
            handle.seek(start)
            placeholders = [(type(f'Dropped_{n}', (_Dropped,), {'name': n}), n) for n in dropped]
        try:
            with torch.serialization.safe_globals(placeholders):
                loaded = torch.serialization.load(handle, map_location=map_location, weights_only=not trusted)
        except pickle.UnpicklingError as error:   # an opcode or construct the safe unpickler refuses
            if trusted:
                raise _corrupt(what, label, error, size) from error
            raise _untrusted(what, label, str(error).split('WeightsUnpickler error:')[-1].strip()[:200]) from None
        except (RuntimeError, EOFError, OSError, UnicodeDecodeError, KeyError, TypeError) as error:
            if isinstance(error, (PermissionError, FileNotFoundError)):
                raise
            raise _corrupt(what, label, error, size) from error
    if trusted:
        return loaded
    ignored: List[str] = []
    loaded = _walk(loaded, what, label, ignored)
    if isinstance(loaded, dict) and ('meta' in loaded or 'message_hub' in loaded):
        conform_mmengine(loaded, ignored, what, label)
    if ignored:
        print(f'{what} {label}: ignored {len(ignored)} entr{"y" if len(ignored) == 1 else "ies"} a checkpoint of '
              f'this project does not read: {"; ".join(ignored[:10])}{" ..." if len(ignored) > 10 else ""}', flush=True)
    return loaded


@contextlib.contextmanager
def torch_load_as_data(label: Optional[str] = None) -> Iterator[None]:
    """Within the block, ``torch.load`` is :func:`read_checkpoint`: another library's loader
    (mmengine's schemes, torch.hub, open_clip's ``load_checkpoint``, LAVIS's model loaders) reads
    its file against the schema, once. ``torch.load`` is restored on exit; blocks nest.

    Args:
        label: how the file is called in messages (e.g. the URL a downloaded file came from);
            default the path ``torch.load`` was given.

    Usage::

        >>> with torch_load_as_data():                  # doctest: +SKIP
        ...     model = open_clip.create_model('RN50', pretrained='/path/to/weights.pt')
    """
    real_load = torch.load

    def load_as_data(source: Any, map_location: Any = None, *unused: Any, **ignored: Any) -> Any:
        # torch.load's other arguments (pickle_module, weights_only, mmap) do not apply to a schema read
        name = label
        if label is not None and isinstance(source, (str, os.PathLike)) and os.fspath(source) != label:
            name = f'{label} ({os.fspath(source)})'     # e.g. the URL, then the cached file
        return read_checkpoint(source, map_location=map_location, label=name)

    torch.load = load_as_data
    try:
        yield
    finally:
        torch.load = real_load


def _path(node: Optional[Tuple]) -> str:
    keys = []
    while node is not None:
        node, key = node
        keys.append(f'[{key!r}]')
    return 'checkpoint' + ''.join(reversed(keys))


def _check_tensor(tensor: torch.Tensor, where: str, what: str, label: str) -> None:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided or tensor.is_meta:
        raise _untrusted(what, label, f'a {type(tensor).__name__} ({tensor.layout}, {tensor.device}) at {where}; '
                         'only dense tensors are read')
    need = tensor.numel() * tensor.element_size()
    have = tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
    if need > have:
        raise _untrusted(what, label, f'a tensor at {where} of shape {tuple(tensor.shape)} and strides '
                         f'{tensor.stride()} over {have} bytes of storage ({need} bytes once expanded)')


def _walk(root: Any, what: str, label: str, ignored: List[str]) -> Any:
    """Check ``root`` against the container rules (module docstring); drop the dict entries that hold
    placeholders, listing them in ``ignored``. Each object is visited once: the cost is its size."""
    seen: Dict[int, bool] = {}
    drops: List[Tuple[Any, Any, str]] = []
    stack: List[Tuple[Any, Optional[Tuple], int, Optional[Tuple[Any, Any, Optional[Tuple]]]]] = [(root, None, 0, None)]
    while stack:
        obj, node, depth, slot = stack.pop()
        if isinstance(obj, _Dropped):
            if slot is None:
                raise _untrusted(what, label, f'{obj.name} at {_path(node)} (numpy and mmengine objects are not read)')
            drops.append((slot[0], slot[1], f'{_path(slot[2])} ({obj.name})'))
            continue
        if type(obj) in _ATOMS:
            continue
        if isinstance(obj, torch.Tensor):
            _check_tensor(obj, _path(node), what, label)
            continue
        if type(obj) not in (dict, OrderedDict, list, tuple):
            raise _untrusted(what, label, f'a {type(obj).__name__} at {_path(node)}')
        if id(obj) in seen:
            if type(obj) in (list, tuple) and len(obj) <= 16 and all(type(v) in _ATOMS for v in obj):
                continue   # a few numbers shared (an optimizer's betas in every group): copies stay small
            raise _untrusted(what, label, f'a {type(obj).__name__} at {_path(node)} that is also reachable by another '
                             'path (shared references are refused: copying them can take unbounded memory)')
        if depth >= MAX_DEPTH:
            raise _untrusted(what, label, f'containers nested deeper than {MAX_DEPTH} at {_path(node)}')
        seen[id(obj)] = True
        if isinstance(obj, dict):
            for key, value in obj.items():
                if type(key) not in (str, int, float, bool):
                    raise _untrusted(what, label, f'a dict key of type {type(key).__name__} at {_path(node)}')
                stack.append((value, (node, key), depth + 1, (obj, key, (node, key))))
            stack.extend((value, (node, f'.{name}'), depth + 1, slot) for name, value in getattr(obj, '__dict__', {}).items())
        else:
            stack.extend((value, (node, index), depth + 1, slot) for index, value in enumerate(obj))
    for parent, key, where in drops:
        if key in parent:
            del parent[key]
            ignored.append(where)
    return root


def _plain_number_list(values: Any, limit: int = MAX_HISTORY) -> bool:
    return type(values) is list and len(values) <= limit and all(type(v) in (int, float) for v in values)


def conform_mmengine(checkpoint: dict, ignored: List[str], what: str = 'checkpoint', label: str = '') -> dict:
    """Keep of an mmengine checkpoint's ``meta`` and ``message_hub`` only what the schema allows."""
    meta = checkpoint.setdefault('meta', {})
    if not isinstance(meta, dict):
        raise _untrusted(what, label, f'meta of type {type(meta).__name__}; expected a dict')
    for key in [k for k in meta if k not in _META_KEYS]:
        ignored.append(f"meta[{key!r}]" + (' (config text: never executed)' if key == 'config' else ''))
        del meta[key]
    for key in ('epoch', 'iter'):
        if key in meta and (type(meta[key]) is not int or meta[key] < 0):
            raise _untrusted(what, label, f'meta[{key!r}] = {meta[key]!r:.40}; expected a non-negative int')
    hub = checkpoint.get('message_hub')
    if hub is None:
        return checkpoint
    if not isinstance(hub, dict) or not all(isinstance(hub.get(k), dict) for k in ('log_scalars', 'runtime_info')):
        raise _untrusted(what, label, 'a message_hub that is not a dict of log_scalars and runtime_info dicts')
    scalars, info = hub['log_scalars'], hub['runtime_info']
    for key, value in list(scalars.items()):
        if not (isinstance(value, dict) and _plain_number_list(value.get('log')) and _plain_number_list(value.get('count'))
                and len(value['log']) == len(value['count']) and type(value.get('max_length')) is int
                and 0 < value['max_length'] <= MAX_HISTORY):
            ignored.append(f'message_hub log_scalars[{key!r}] (not plain lists of at most {MAX_HISTORY} numbers)')
            del scalars[key]
    for key in list(info):
        known = key in _INFO_KEYS or str(key).startswith(('best_score_', 'val/', 'test/'))   # metrics
        if not known or type(info[key]) not in (str, int, float, bool):
            if not str(key).startswith(_QUIET):
                ignored.append(f'message_hub runtime_info[{key!r}]')
            del info[key]
    resumed = hub.get('resumed_keys') if isinstance(hub.get('resumed_keys'), dict) else {}
    hub['resumed_keys'] = {k: bool(v) for k, v in resumed.items() if k in scalars or k in info}
    return checkpoint
