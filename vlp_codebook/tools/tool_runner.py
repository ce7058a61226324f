"""The mmengine ``Runner`` the tools build: a console for people, build errors that name their key.

:class:`ToolRunner` behaves as mmengine's ``Runner`` (same config, log file, checkpoints) except:

* **Console.** The environment block, the config dump, the hook table and two mmengine notices
  go to the log file only; training lines keep epoch/iteration, ``eta``, ``time`` and ``loss``
  (the file keeps every term). Without CUDA the environment block names the CPU device.
  :class:`VerboseToolRunner` (``--verbose``) prints everything.
* **Noise.** mmengine's ``FileClient``/``HardDiskBackend`` deprecation warnings are dropped.
* **Build errors** while building ``model``, hooks, loops, optimizer or schedulers get a
  ``config_key`` attribute (and a traceback note), narrowed to the argument when the message names
  it (``model.image_encoder.foo``); :func:`vlp_codebook.tools.cli.format_error` prints it.
* **Resume**: ``--resume`` without a path takes
  :func:`vlp_codebook.engine.resume.pick_resume_checkpoint`'s choice (one line says which and why).

Usage::

    runner = ToolRunner.from_cfg(cfg)          # as Runner.from_cfg
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from mmengine.runner import Runner

__all__ = ['ToolRunner', 'VerboseToolRunner', 'locate_config_key', 'device_description']

#: console messages that start so go to the log file only
FILE_ONLY_PREFIXES = ('Config:', '\n' + '-' * 60 + '\nSystem environment:', 'Hooks will be executed',
                      'Distributed training is not used', 'Exp name:')
#: mmengine warnings dropped altogether (console and file)
DROPPED_MESSAGES = ('"FileClient" will be deprecated', '"HardDiskBackend" is the alias')
#: the fields of a training log line the console keeps
CONSOLE_TRAIN_FIELDS = ('eta', 'time', 'loss')

_TRAIN_LINE = re.compile(r'^(?P<head>Epoch\(train\)\s*\[[^\]]*\]\s*\[[^\]]*\]|Iter\(train\)\s*\[[^\]]*\])\s+(?P<rest>.*)$',
                         re.S)
_FIELD = re.compile(r'(?P<name>[\w/.@-]+): (?P<value>\S+)')
_UNEXPECTED_ARG = re.compile(r"(?P<cls>\w+)\.__init__\(\) got an unexpected keyword argument '(?P<arg>\w+)'")
# mmengine's "X is not in the scope::model registry" and our "type='X' is not registered in ..."
_UNKNOWN_TYPE = re.compile(r"^'?(?P<type>[\w.]+)'? is not in the|type='(?P<type2>[\w.]+)' is not registered")


def device_description() -> str:
    """``'CPU (2 torch threads)'`` or ``'CUDA: 8 x NVIDIA H100 ...'``."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f'CUDA: {count} x {torch.cuda.get_device_name(0)}'
    threads = torch.get_num_threads()
    return f'CPU ({threads} torch thread{"s" if threads != 1 else ""})'


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DROPPED_MESSAGES)


class _FileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(FILE_ONLY_PREFIXES)


def compact_train_line(message: str) -> str:
    """``Epoch(train) [1][25/125]  eta: 0:02:10  time: 0.1300  loss: 38.8959`` from mmengine's line."""
    match = _TRAIN_LINE.match(message)
    if match is None:
        return message
    fields = {m.group('name'): m.group('value') for m in _FIELD.finditer(match.group('rest'))}
    kept = [f'{name}: {fields[name]}' for name in CONSOLE_TRAIN_FIELDS if name in fields]
    return '  '.join([match.group('head')] + kept) if kept else message


class _CompactFormatter(logging.Formatter):
    """Formats a copy of the record with :func:`compact_train_line`, then as ``inner`` does."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.args or not isinstance(record.msg, str) or not _TRAIN_LINE.match(record.msg):
            return self.inner.format(record)
        short = logging.makeLogRecord(record.__dict__)
        short.msg = compact_train_line(record.msg)
        return self.inner.format(short)


def _walk(node: Any, path: str) -> Iterator[Tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f'{path}.{key}' if path else str(key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _walk(value, f'{path}[{index}]')


def _type_name(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value.rsplit('.', 1)[-1]
    return getattr(value, '__name__', None)


def locate_config_key(cfg: Any, keys: Sequence[str], error: BaseException) -> str:
    """The config entry ``error`` points at, among the top-level ``keys`` being built.

    Narrowed down from the message when it names an unexpected keyword argument of a class or
    an unknown type, and that class/type appears in exactly one place; else the keys themselves.
    """
    message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    candidates: List[str] = []
    arg = _UNEXPECTED_ARG.search(message)
    unknown = _UNKNOWN_TYPE.search(message)
    for key in keys:
        for path, node in _walk(cfg.get(key) if hasattr(cfg, 'get') else None, key):
            if not isinstance(node, dict):
                continue
            type_name = _type_name(node.get('type'))
            if arg is not None and arg.group('arg') in node and (type_name in (None, arg.group('cls'))):
                candidates.append(f'{path}.{arg.group("arg")}')
            elif unknown is not None and type_name is not None and \
                    type_name == _type_name(unknown.group('type') or unknown.group('type2')):
                candidates.append(f'{path}.type')
    if len(candidates) == 1:
        return candidates[0]
    present = [key for key in keys if hasattr(cfg, 'get') and cfg.get(key) is not None]
    return ' / '.join(present or keys)


class ToolRunner(Runner):
    """mmengine's ``Runner`` with a quiet console and build errors that name their config key."""

    verbose = False

    @contextmanager
    def _building(self, *keys: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            if getattr(error, 'config_key', None) is None:
                key = locate_config_key(getattr(self, 'cfg', {}), keys, error)
                try:
                    error.config_key = key
                except AttributeError:  # pragma: no cover - exceptions with __slots__
                    pass
                else:
                    if hasattr(error, 'add_note'):
                        error.add_note(f'(while building config key {key!r})')
            raise

    def build_logger(self, log_level='INFO', log_file=None, **kwargs):
        logger = super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages())
        if not self.verbose:
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                        and not any(isinstance(f, _FileOnly) for f in handler.filters):
                    handler.addFilter(_FileOnly())
                    handler.setFormatter(_CompactFormatter(handler.formatter or logging.Formatter()))
        return logger

    def _log_env(self, env_cfg: dict) -> None:
        """mmengine's environment block, with the device instead of ``GPU number`` without CUDA."""
        import torch
        from mmengine.utils.dl_utils import collect_env

        runtime = OrderedDict(env_cfg)
        runtime.update(self._randomness_cfg)
        runtime['seed'] = self._seed
        runtime['Distributed launcher'] = self._launcher
        runtime['Distributed training'] = self._distributed
        if torch.cuda.is_available():
            runtime['GPU number'] = self._world_size
        else:
            runtime['device'] = device_description()
            runtime['processes'] = self._world_size
        lines = ['', '-' * 60, 'System environment:']
        lines += [f'    {k}: {v}' for k, v in collect_env().items()]
        lines += ['', 'Runtime environment:']
        lines += [f'    {k}: {v}' for k, v in runtime.items()]
        lines += ['-' * 60, '']
        self.logger.info('\n'.join(lines))
        if self.cfg._cfg_dict:
            self.logger.info(f'Config:\n{self.cfg.pretty_text}')
        log_file = next((h.baseFilename for h in self.logger.handlers if isinstance(h, logging.FileHandler)), None)
        self.logger.info(f'{self._experiment_name}: device {device_description()}, work dir {self._work_dir}'
                         + (f', log (with the config) {log_file}' if log_file else ''))

    def load_or_resume(self) -> None:
        """As mmengine's, with the checkpoint of an automatic resume verified (see the module docstring)."""
        if not self._has_loaded and self._resume and self._load_from is None:
            from vlp_codebook.engine.resume import pick_resume_checkpoint

            path, message = pick_resume_checkpoint(self.work_dir)
            if message:
                self.logger.warning(message)
            if path is None:
                self._resume = False
                return None
            self.logger.info(f'--resume: resuming from {path}')
            self._load_from = path   # mmengine then resumes from it (and the hooks can name it)
        return super().load_or_resume()

    def build_model(self, model):
        with self._building('model'):
            return super().build_model(model)

    def register_hooks(self, default_hooks=None, custom_hooks=None):
        with self._building('default_hooks', 'custom_hooks'):
            return super().register_hooks(default_hooks, custom_hooks)

    def build_train_loop(self, loop):
        with self._building('train_cfg', 'train_dataloader'):
            return super().build_train_loop(loop)

    def build_val_loop(self, loop):
        with self._building('val_cfg', 'val_dataloader', 'val_evaluator'):
            return super().build_val_loop(loop)

    def build_test_loop(self, loop):
        with self._building('test_cfg', 'test_dataloader', 'test_evaluator'):
            return super().build_test_loop(loop)

    def build_optim_wrapper(self, optim_wrapper):
        with self._building('optim_wrapper'):
            return super().build_optim_wrapper(optim_wrapper)

    def build_param_scheduler(self, scheduler):
        with self._building('param_scheduler'):
            return super().build_param_scheduler(scheduler)


class VerboseToolRunner(ToolRunner):
    """:class:`ToolRunner` that prints everything on the console, as mmengine does (``--verbose``)."""

    verbose = True
