"""Crash-safe checkpoints: a file is either the old one or the complete new one, never half of each.

mmengine truncates the final path before writing, so a run killed meanwhile leaves a broken
``.pth`` and a ``last_checkpoint`` pointing at it. Here every write goes to ``.NAME.XXXX.tmp`` in
the same directory, is ``fsync``-ed and ``os.replace``-d over the final name (:func:`atomic_write`,
:class:`AtomicLocalBackend`). :class:`AtomicCheckpointHook` saves through that backend, updates
``last_checkpoint`` only after the checkpoint is complete and deletes checkpoints beyond
``max_keep_ckpts`` only after the new one is in place (mmengine deletes first). It writes the
message hub's logged scalars as plain lists (what :mod:`vlp_codebook.checkpoint_io` reads) and
never deletes a path or step found in a checkpoint: what to prune, and the previous best, come
from the output directory's own listing; temporary files of a killed save are removed at the
start. The train tool swaps a config's plain ``CheckpointHook`` for it (:func:`use_atomic_checkpoint_hook`).

Usage in a config::

    default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook', interval=1, max_keep_ckpts=3))
"""
from __future__ import annotations

import os
import os.path as osp
import re
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook

from vlp_codebook.registry import HOOKS

__all__ = ['ATOMIC_BACKEND', 'TEMP_SUFFIX', 'atomic_write', 'AtomicLocalBackend', 'AtomicCheckpointHook',
           'use_atomic_checkpoint_hook']

#: the name :class:`AtomicLocalBackend` is registered under (``backend_args=dict(backend=...)``)
ATOMIC_BACKEND = 'vlp_codebook_atomic_local'
#: how the temporary files end (``.iter_8.pth.k3j2.tmp``)
TEMP_SUFFIX = '.tmp'
_LEFTOVER = re.compile(r'\.(?:[\w.-]+\.pth|last_checkpoint)\.\w+\.tmp')


def _write_all(handle: Any, data: Union[bytes, str]) -> None:
    """Write ``data`` to the open temporary file (one call; a seam for the crash tests)."""
    handle.write(data)


def _sync_directory(directory: str) -> None:
    if os.name != 'posix':   # pragma: no cover - directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], data: Union[bytes, str], encoding: str = 'utf-8') -> None:
    """Replace ``path`` by ``data`` so that a crash at any moment leaves the old file or the new one.

    Writes ``data`` to a temporary file in the same directory, flushes and fsyncs it, then
    ``os.replace``-s it over ``path`` and fsyncs the directory. The directory is created if needed.
    On an error the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f'.{osp.basename(path)}.', suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, 'wb' if isinstance(data, bytes) else 'w',
                       **({} if isinstance(data, bytes) else {'encoding': encoding})) as handle:
            _write_all(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        if osp.exists(path):   # mkstemp creates 0600; keep the mode a plain open() would have given
            os.chmod(temp, os.stat(path).st_mode & 0o777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    except BaseException:
        if osp.exists(temp):
            os.remove(temp)
        raise
    _sync_directory(directory)


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend; ``put`` and ``put_text`` replace files atomically (:func:`atomic_write`)."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        atomic_write(filepath, obj, encoding=encoding)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


def _is_local(path: Optional[Union[str, Path]]) -> bool:
    return path is None or '://' not in os.fspath(path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (same arguments) with crash-safe writes (see the module docstring).

    With ``backend_args``/``file_client_args`` naming another storage (``s3://`` ...), or an
    ``out_dir`` URL, the checkpoint goes through that storage as in mmengine; ``last_checkpoint``
    is still replaced atomically, and old checkpoints are still deleted only after the new one is saved.
    """

    def __init__(self, *args: Any, backend_args: Optional[dict] = None, file_client_args: Optional[dict] = None,
                 out_dir: Optional[Union[str, Path]] = None, **kwargs: Any):
        if backend_args is None and file_client_args is None and _is_local(out_dir):
            backend_args = dict(backend=ATOMIC_BACKEND)
        super().__init__(*args, out_dir=out_dir, backend_args=backend_args,
                         file_client_args=file_client_args, **kwargs)

    def before_train(self, runner) -> None:
        """mmengine's, except that no path or step number from the resumed message hub is used to
        delete anything: the kept steps and the previous best checkpoint come from the listing of
        the output directory (regular files named as this hook names them, at or below the current
        step); leftover temporary files of a killed save are removed."""
        info = runner.message_hub.runtime_info
        for key in [k for k in info if k == 'keep_ckpt_ids' or k.startswith('best_ckpt')]:
            info.pop(key)
        super().before_train(runner)
        if not (_is_local(self.out_dir) and osp.isdir(self.out_dir)):
            return
        current = runner.epoch if self.by_epoch else runner.iter
        self.keep_ckpt_ids = deque(step for step, _ in self._listed(self.filename_tmpl) if step <= current)
        for key in getattr(self, 'key_indicators', None) or []:
            best = [path for step, path in self._listed(f'best_{key}_{self.filename_tmpl}'.replace('/', '_'))
                    if step <= current]
            if len(self.key_indicators) == 1:
                self.best_ckpt_path = best[-1] if best else None
            else:
                self.best_ckpt_path_dict[key] = best[-1] if best else None
        for name in os.listdir(self.out_dir) if is_main_process() else ():
            path = osp.join(self.out_dir, name)
            if _LEFTOVER.fullmatch(name) and osp.isfile(path) and not osp.islink(path):
                os.remove(path)
                runner.logger.info(f'removed {path}, left by an interrupted save')

    def _listed(self, template: str) -> List[tuple]:
        """``(step, path)`` of the output directory's regular files named ``template`` (``{}``: the
        step), by step."""
        pattern = re.compile(re.escape(template).replace(re.escape('{}'), r'(\d+)'))
        found = []
        for name in os.listdir(self.out_dir):
            match = pattern.fullmatch(name)
            path = osp.join(self.out_dir, name)
            if match and osp.isfile(path) and not osp.islink(path):
                found.append((int(match.group(1)), path))
        return sorted(found)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Write the message hub as plain data: each ``HistoryBuffer`` as ``{'log': [...], 'count':
        [...], 'max_length': n}``, numpy numbers of ``runtime_info`` as Python numbers."""
        hub = checkpoint.get('message_hub') or {}
        scalars: Dict[str, Any] = hub.get('log_scalars') or {}
        for key, buffer in list(scalars.items()):
            if hasattr(buffer, 'data') and hasattr(buffer, 'max_length'):
                log, count = buffer.data
                scalars[key] = {'log': [float(v) for v in log.tolist()], 'count': [int(v) for v in count.tolist()],
                                'max_length': int(buffer.max_length)}
        info = hub.get('runtime_info') or {}
        for key, value in list(info.items()):
            if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:
                info[key] = value.item()

    def _save_checkpoint_with_step(self, runner, step: int, meta: dict) -> None:
        """As mmengine's, in a crash-safe order: save, then point ``last_checkpoint`` at it, then
        delete the checkpoints beyond ``max_keep_ckpts``."""
        outdated: List[int] = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            while len(self.keep_ckpt_ids) >= self.max_keep_ckpts:
                outdated.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(self.out_dir, ckpt_filename, self.file_client_args,
                               save_optimizer=self.save_optimizer, save_param_scheduler=self.save_param_scheduler,
                               meta=meta, by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return
        atomic_write(osp.join(runner.work_dir, 'last_checkpoint'), str(self.last_ckpt))
        for old in outdated:
            if old == step:
                continue
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
            if self.file_backend.isfile(path) and not (_is_local(path) and osp.islink(path)):
                self.file_backend.remove(path)


def use_atomic_checkpoint_hook(cfg: Any) -> bool:
    """Swap ``cfg.default_hooks.checkpoint`` of type ``CheckpointHook`` for :class:`AtomicCheckpointHook`.

    Returns whether the config now uses it. A config naming another checkpoint hook keeps it.
    """
    hooks = cfg.get('default_hooks') or {}
    checkpoint = hooks.get('checkpoint')
    if not isinstance(checkpoint, dict):
        return False
    kind = checkpoint.get('type')
    if kind in ('CheckpointHook', 'mmengine.CheckpointHook', CheckpointHook):
        checkpoint['type'] = 'AtomicCheckpointHook'
        return True
    return kind in ('AtomicCheckpointHook', AtomicCheckpointHook)
