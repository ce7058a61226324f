"""Runner hooks that connect a model's training-time duties to the mmengine loop.

The hook talks to the model through an optional method (duck typing), so a model that lacks
it is simply skipped and a config can list the hook for every model. (Momentum teachers and the
α ramp need no hook: CODIS updates them inside its own training step, from step counters kept
in its state dict.)

* :class:`ModelScalarsLoggerHook` -- ``model.extra_log_scalars()`` (``dict[str, float]``,
  e.g. the learnable temperature, α, codeword usage) after each training iteration, written to
  the runner's message hub as ``train/<name>`` so mmengine's ``LogProcessor`` prints them
  (names not starting with ``loss`` are logged at their latest value).

It runs at priority ``NORMAL``: after the optimizer step (inside ``train_step``), before
``LoggerHook`` (``BELOW_NORMAL``) reads the message hub.

Usage in a config::

    custom_hooks = [dict(type='ModelScalarsLoggerHook')]
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Optional

import torch
from mmengine.hooks import Hook

from vlp_codebook.models.teachers.momentum_teacher import unwrap_model
from vlp_codebook.registry import HOOKS

__all__ = ['ModelScalarsLoggerHook', 'unwrap_model']


@HOOKS.register_module()
class ModelScalarsLoggerHook(Hook):
    """Log ``model.extra_log_scalars()`` (str -> Python number or one-element tensor) as
    ``train/<name>`` in the runner's message hub; ``TypeError`` for another type, ``ValueError``
    naming a NaN or infinite scalar."""

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
