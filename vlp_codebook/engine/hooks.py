"""Runner hooks that connect a model's training-time duties to the mmengine loop.

Both hooks talk to the model through optional methods (duck typing), so a model that lacks
a method is simply skipped and a config can list the hooks for every model:

* :class:`MomentumTeacherHook` -- ``model.set_train_progress(epoch, iter, max_iters)`` before
  each training iteration (e.g. for ALBEF's distillation weight α, ramped over the first
  epoch), and ``model.momentum_update()`` after each one, i.e. after the optimizer step
  (EMA teacher ``θ_m ← m θ_m + (1 − m) θ``; ALBEF momentum 0.995).
* :class:`ModelScalarsLoggerHook` -- ``model.extra_log_scalars()`` (``dict[str, float]``,
  e.g. the learnable temperature, α, codeword usage) after each training iteration, written to
  the runner's message hub as ``train/<name>`` so mmengine's ``LogProcessor`` prints them
  (names not starting with ``loss`` are logged at their latest value).

Both run at priority ``NORMAL``: after the optimizer step (inside ``train_step``), before
``LoggerHook`` (``BELOW_NORMAL``) reads the message hub and before ``CheckpointHook``
(``VERY_LOW``) saves, so a checkpoint holds the teacher *after* this iteration's update and a
resumed run continues exactly.

Usage in a config::

    custom_hooks = [dict(type='MomentumTeacherHook'), dict(type='ModelScalarsLoggerHook')]
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Optional

import torch
from mmengine.hooks import Hook

from vlp_codebook.models.teachers.momentum_teacher import unwrap_model
from vlp_codebook.registry import HOOKS

__all__ = ['MomentumTeacherHook', 'ModelScalarsLoggerHook', 'unwrap_model']


@HOOKS.register_module()
class MomentumTeacherHook(Hook):
    """Drive the model's momentum teacher: progress before each train iteration, EMA after.

    Calls, when the model defines them:

    * ``model.set_train_progress(epoch, iter, max_iters)`` in ``before_train_iter`` with the
      runner's current epoch, global iteration (0-based, the one about to run) and total
      number of training iterations;
    * ``model.momentum_update()`` in ``after_train_iter``.
    """

    priority = 'NORMAL'

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        model = unwrap_model(runner.model)
        set_progress = getattr(model, 'set_train_progress', None)
        if callable(set_progress):
            set_progress(runner.epoch, runner.iter, runner.max_iters)

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        model = unwrap_model(runner.model)
        momentum_update = getattr(model, 'momentum_update', None)
        if callable(momentum_update):
            momentum_update()


@HOOKS.register_module()
class ModelScalarsLoggerHook(Hook):
    """Log ``model.extra_log_scalars()`` as ``train/<name>`` in the runner's message hub.

    Raises:
        TypeError: ``extra_log_scalars()`` did not return a dict of str -> number (a Python
            number or a one-element tensor).
        ValueError: a value is NaN or infinite (the message names the scalar).
    """

    priority = 'NORMAL'

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        model = unwrap_model(runner.model)
        extra_log_scalars = getattr(model, 'extra_log_scalars', None)
        if not callable(extra_log_scalars):
            return
        scalars = extra_log_scalars()
        if not isinstance(scalars, dict):
            raise TypeError(f'{type(model).__name__}.extra_log_scalars() must return a dict '
                            f'str -> float, got {type(scalars).__name__}')
        for name, value in scalars.items():
            runner.message_hub.update_scalar(f'train/{name}', _as_float(name, value))


def _as_float(name: Any, value: Any) -> float:
    if not isinstance(name, str):
        raise TypeError(f'extra_log_scalars(): keys must be str, got {name!r}')
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f'extra_log_scalars()[{name!r}] must be a scalar, got a tensor of shape '
                            f'{tuple(value.shape)}')
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f'extra_log_scalars()[{name!r}] must be a number, got {type(value).__name__}')
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f'extra_log_scalars()[{name!r}] is {value}')
    return value
