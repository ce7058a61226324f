"""No number from the wrong weights: how much of a model a checkpoint fills, checked before use.

mmengine loads ``load_from`` with ``strict=False`` and reports missing keys in one log line, so a
checkpoint of another model would evaluate a *randomly initialised* model with exit code 0. Here
:func:`state_dict_coverage` sorts a model's keys into ``loaded``, ``missing``, ``mismatched``
(same name, other shape, unless a module on the key's path says with ``can_load_shape(name,
shape)`` that it resizes it, as the ViT does with its position grid) and ``unexpected``, and
:func:`check_coverage` refuses (``RuntimeError`` listing the keys) by mode:

* ``'evaluate'`` (test tool, :func:`load_model_weights` for the Grad-CAM and plot tools) and
  ``'resume'``: any parameter left unloaded; ``--allow-missing-weights`` only warns;
* ``'finetune'`` (``load_from`` in training): any key beyond ``expected_missing`` (fnmatch
  patterns: the config's ``load_from_expected_missing``, else the model attribute of that name,
  else :data:`EXPECTED_MISSING_FROM_ALBEF`, what a converted ALBEF checkpoint lacks).

NaN or inf in a floating tensor of the state dict is refused too (:func:`check_finite`;
``--allow-nonfinite`` only warns): a diverged run's weights give numbers that mean nothing.
:class:`CheckpointCoverageHook` runs both checks when the Runner loads a checkpoint, before
the weights are copied::

    custom_hooks = [dict(type='CheckpointCoverageHook', mode='finetune')]
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from torch import nn

from vlp_codebook.models.teachers.momentum_teacher import unwrap_model
from vlp_codebook.registry import HOOKS

__all__ = ['EXPECTED_MISSING_FROM_ALBEF', 'Coverage', 'state_dict_coverage', 'checkpoint_state_dict',
           'check_coverage', 'nonfinite_keys', 'check_finite', 'load_model_weights', 'CheckpointCoverageHook']

#: fnmatch patterns of CODIS state-dict keys that an ALBEF checkpoint (converted) does not hold
EXPECTED_MISSING_FROM_ALBEF: Tuple[str, ...] = (
    'codebook_loss.codebook.*',   # the codebook is CODIS's own
    'image_queue.*', 'text_queue.*',  # teacher feature queues refill within queue_size / batch steps
    'num_steps', 'num_anonymous_ids', '*.num_updates',  # counters
)
MODES = ('evaluate', 'finetune', 'resume')
_SHOWN = 20


@dataclass
class Coverage:
    """Keys of a model's state dict (parameters and persistent buffers) against a checkpoint's."""
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint, model)
    unexpected: List[str] = field(default_factory=list)
    parameters: frozenset = frozenset()

    @property
    def unloaded(self) -> List[str]:
        """Missing or of another shape: the model keeps its initial values there."""
        return sorted(self.missing + [key for key, _, _ in self.mismatched])

    @property
    def unloaded_parameters(self) -> List[str]:
        return [key for key in self.unloaded if key in self.parameters]

    def summary(self) -> str:
        """``loaded 120/124 keys; missing 4; shape mismatch 0; unexpected 2``."""
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        return (f'loaded {len(self.loaded)}/{total} keys; missing {len(self.missing)}; '
                f'shape mismatch {len(self.mismatched)}; unexpected {len(self.unexpected)}')


def checkpoint_state_dict(checkpoint: Any) -> Mapping[str, Any]:
    """The state dict inside ``checkpoint`` as mmengine reads it (``['state_dict']`` if there,
    ``_metadata`` dropped, mmengine's default ``revise_keys``: a leading ``module.`` removed)."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get('state_dict'), Mapping):
        checkpoint = checkpoint['state_dict']
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f'the checkpoint holds a {type(checkpoint).__name__}, not a state dict')
    return {re.sub(r'^module\.', '', k): v for k, v in checkpoint.items() if k != '_metadata'}


def state_dict_coverage(model: nn.Module, state: Mapping[str, Any]) -> Coverage:
    """Which of ``model``'s state-dict keys ``state`` (name -> tensor) fills."""
    model = unwrap_model(model)
    own = model.state_dict()
    coverage = Coverage(parameters=frozenset(name for name, _ in model.named_parameters()))
    for key, value in own.items():
        if key not in state:
            coverage.missing.append(key)
        elif (isinstance(state[key], torch.Tensor) and tuple(state[key].shape) != tuple(value.shape)
              and not _resized_on_load(model, key, tuple(state[key].shape))):
            coverage.mismatched.append((key, tuple(state[key].shape), tuple(value.shape)))
        else:
            coverage.loaded.append(key)
    coverage.unexpected = sorted(k for k in state if k not in own)
    return coverage


def _resized_on_load(model: nn.Module, key: str, shape: tuple) -> bool:
    """Whether a module on ``key``'s path declares (``can_load_shape``) that it resizes this tensor
    when loading (the ViT's position grid of another image size)."""
    parts = key.split('.')
    for depth in range(len(parts) - 1, -1, -1):
        prefix = '.'.join(parts[:depth])
        try:
            module = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            continue
        check = getattr(module, 'can_load_shape', None)
        if callable(check) and check('.'.join(parts[depth:]), shape):
            return True
    return False


def _listing(keys: Sequence[str]) -> str:
    shown = ', '.join(keys[:_SHOWN])
    return shown + (f', ... ({len(keys) - _SHOWN} more)' if len(keys) > _SHOWN else '')


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def check_coverage(coverage: Coverage, source: str, mode: str = 'evaluate', allow_missing: bool = False,
                   expected_missing: Optional[Iterable[str]] = None) -> None:
    """Raise ``RuntimeError`` if ``coverage`` is not enough for ``mode`` (see the module docstring);
    ``allow_missing`` (``--allow-missing-weights``) only warns."""
    flag = '--allow-missing-weights'
    if mode == 'finetune':
        patterns = tuple(EXPECTED_MISSING_FROM_ALBEF if expected_missing is None else expected_missing)
        bad = [key for key in coverage.unloaded if not _matches(key, patterns)]
        why = (f'{len(bad)} model key(s) beyond the expected fresh ones ({", ".join(patterns) or "none"}) '
               'are not in it or have another shape')
    else:
        bad = coverage.unloaded_parameters
        why = f'{len(bad)} of the model\'s {len(coverage.parameters)} parameters are not in it or have another shape'
    if not bad:
        return
    shapes = {key: (ckpt, mine) for key, ckpt, mine in coverage.mismatched}
    listed = _listing([f'{k} (checkpoint {shapes[k][0]} vs model {shapes[k][1]})' if k in shapes else k
                       for k in bad])
    message = (f'checkpoint {source}: {why}, so they would keep their random initial values. '
               f'{coverage.summary()}. Unloaded: {listed}.')
    if coverage.unexpected:
        message += f' The checkpoint has {len(coverage.unexpected)} key(s) the model lacks, e.g. ' \
                   f'{_listing(coverage.unexpected[:5])} (another model or config?).'
    if allow_missing:
        print_log(f'{message} Continuing because of {flag}.', logger='current', level=30)
        return
    what = {'evaluate': 'Metrics of such a model mean nothing', 'resume': 'This is not a checkpoint of this model',
            'finetune': 'Fine-tuning would start these from scratch'}[mode]
    hint = (' (or list them in the config as load_from_expected_missing = [...])' if mode == 'finetune' else '')
    raise RuntimeError(f'{message} {what}: check the checkpoint and the config. '
                       f'To go on anyway, pass {flag}{hint}.')


def nonfinite_keys(state: Mapping[str, Any]) -> List[Tuple[str, int, int]]:
    """``(key, NaN count, inf count)`` of the floating (and complex) tensors of ``state`` that hold NaN or inf."""
    bad = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) and value.numel():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                nans = int(torch.isnan(value).sum())
                bad.append((str(key), nans, int((~finite).sum()) - nans))
    return bad


def check_finite(state: Mapping[str, Any], source: str, allow: bool = False, flag: str = '--allow-nonfinite') -> None:
    """Raise ``ValueError`` naming the keys (the first few and the count) if a floating tensor of
    ``state`` holds NaN or inf; with ``allow`` only warn."""
    bad = nonfinite_keys(state)
    if not bad:
        return
    shown = ', '.join(f'{key} ({nans} NaN, {infs} inf)' for key, nans, infs in bad[:5])
    more = f' and {len(bad) - 5} more' if len(bad) > 5 else ''
    message = (f'checkpoint {source}: {len(bad)} tensor(s) hold NaN or inf: {shown}{more}. Scores computed '
               'with such weights are meaningless (did the run diverge? an earlier checkpoint may be intact)')
    if allow:
        print_log(f'{message}. Continuing because of {flag}.', logger='current', level=30)
        return
    raise ValueError(f'{message}. {"To go on anyway, pass" if flag.startswith("--allow") else "Use"} {flag}.')


def load_model_weights(model: nn.Module, filename: str, trust: Optional[bool] = None,
                       allow_missing: bool = False, allow_nonfinite: bool = False) -> Coverage:
    """Load a local checkpoint into ``model`` read as data (``trust``: see
    :func:`~vlp_codebook.checkpoint_io.read_checkpoint`), checked as in ``'evaluate'`` mode."""
    from vlp_codebook.checkpoint_io import read_checkpoint

    checkpoint = read_checkpoint(filename, map_location='cpu', trust=trust)
    state = checkpoint_state_dict(checkpoint)
    check_finite(state, str(filename), allow=allow_nonfinite)
    coverage = state_dict_coverage(model, state)
    check_coverage(coverage, str(filename), 'evaluate', allow_missing=allow_missing)
    loadable = {k: v for k, v in state.items() if k in set(coverage.loaded)}
    unwrap_model(model).load_state_dict(loadable, strict=False)
    print_log(f'checkpoint {filename}: {coverage.summary()}', logger='current')
    return coverage


@HOOKS.register_module()
class CheckpointCoverageHook(Hook):
    """Checks every checkpoint the Runner loads against the model (see the module docstring)."""

    priority = 'VERY_HIGH'

    def __init__(self, mode: str = 'evaluate', allow_missing: bool = False,
                 expected_missing: Optional[Sequence[str]] = None, allow_nonfinite: bool = False):
        if mode not in MODES:
            raise ValueError(f'CheckpointCoverageHook: mode must be one of {MODES}, got {mode!r}')
        self.mode = mode
        self.allow_missing = bool(allow_missing)
        self.allow_nonfinite = bool(allow_nonfinite)
        self.expected_missing = None if expected_missing is None else tuple(expected_missing)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = unwrap_model(runner.model)
        state = checkpoint_state_dict(checkpoint)
        coverage = state_dict_coverage(model, state)
        source = getattr(runner, '_load_from', None) or '(path not known)'
        runner.message_hub.update_info('loaded_checkpoint', str(source), resumed=False)  # named by score errors
        # training from NaN weights would fail at the first forward, without naming the checkpoint
        check_finite(state, str(source), allow=self.allow_nonfinite, flag='--allow-nonfinite' if self.mode == 'evaluate'
                     else '--resume / load_from an earlier checkpoint (training from these weights gives NaN)')
        expected = self.expected_missing
        if expected is None:
            expected = getattr(model, 'load_from_expected_missing', None)
        print_log(f'checkpoint {source}: {coverage.summary()}'
                  + (f'; missing: {_listing(coverage.missing)}' if coverage.missing else '')
                  + (f'; unexpected: {_listing(coverage.unexpected)}' if coverage.unexpected else ''),
                  logger='current')
        check_coverage(coverage, str(source), self.mode, self.allow_missing, expected)
