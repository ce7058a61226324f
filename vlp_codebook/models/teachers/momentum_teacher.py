r"""A momentum (EMA) teacher: a slowly moving copy of one or more student modules.

After every training step (ALBEF, MoCo; mmengine's ``ExponentialMovingAverage`` calls ``1 - m``
its momentum):

.. math::
    \theta^{m} \leftarrow m\,\theta^{m} + (1 - m)\,\theta .

``momentum_schedule='cosine'`` (BYOL) raises :math:`m` to ``final_momentum`` over ``total_steps``
updates: :math:`m_k = m_{final} - (m_{final} - m_0)\,(\cos(\pi k / K) + 1) / 2`.

* The copy's parameters have ``requires_grad=False`` and live in this module's ``state_dict``
  with the counter ``num_updates``; the student is a plain reference, not a submodule (its
  parameters would be counted twice), unwrapped from DDP by :func:`unwrap_model`.
* One update is one ``torch._foreach_lerp_`` over all parameters, pairs matched by name once.
* ``teacher_mode='eval'`` keeps the copy in eval mode (no dropout in the targets, BN statistics
  never updated by teacher passes); ``'follow'`` follows ``train()``/``eval()`` as ALBEF's.
* Buffers are copied (``ema_buffers=False``) or averaged (floating ones, ``ema_buffers=True``).
* Call :meth:`reset` after loading weights into the student (ALBEF's ``copy_params``).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from vlp_codebook.registry import MODELS
    >>> encoder, projection = nn.Linear(16, 32), nn.Linear(32, 8)
    >>> teacher = MODELS.build(dict(type='MomentumTeacher', momentum=0.995),
    ...                        default_args=dict(student=[encoder, projection]))
    >>> z_m = teacher(torch.randn(4, 16))   # projection(encoder(x)) of the EMA copy, no grad
    >>> m = teacher.update()                # once per training step; returns the momentum used
"""
from __future__ import annotations

import copy
import math
from typing import List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from mmengine.model import is_model_wrapper

from vlp_codebook.models.host_counters import HostCounters
from vlp_codebook.registry import MODELS

__all__ = ['MomentumTeacher', 'unwrap_model']

StudentType = Union[nn.Module, Sequence[nn.Module], Mapping[str, nn.Module]]


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, mmengine's wrappers included (the
    module itself if it is not wrapped)."""
    while is_model_wrapper(module) or isinstance(module, (nn.parallel.DistributedDataParallel,
                                                           nn.DataParallel)):
        module = module.module
    return module


def _as_module(student: StudentType, name: str = 'student') -> nn.Module:
    """One module, an nn.ModuleList (for a sequence) or an nn.ModuleDict (for a mapping)."""
    if isinstance(student, nn.Module):
        return unwrap_model(student)
    if isinstance(student, Mapping):
        if not student or not all(isinstance(m, nn.Module) for m in student.values()):
            raise TypeError(f'{name} given as a mapping must map names to nn.Module, got '
                            f'{ {k: type(v).__name__ for k, v in student.items()} }')
        return nn.ModuleDict({k: unwrap_model(m) for k, m in student.items()})
    if isinstance(student, (list, tuple)):
        if not student or not all(isinstance(m, nn.Module) for m in student):
            raise TypeError(f'{name} given as a sequence must hold nn.Module objects, got '
                            f'{[type(m).__name__ for m in student]}')
        return nn.ModuleList([unwrap_model(m) for m in student])
    raise TypeError(f'{name} must be an nn.Module, a list/tuple of modules or a dict of modules, '
                    f'got {type(student).__name__}')


@MODELS.register_module()
class MomentumTeacher(HostCounters, nn.Module):
    """EMA copy of student module(s), updated once per step, run without gradient.

    Args:
        student: the module to follow; a list/tuple of modules (called in sequence by
            :meth:`forward`) or a dict of modules (called by name through :meth:`run`).
        momentum: m in [0, 1] (ALBEF: 0.995).
        momentum_schedule, final_momentum, total_steps: ``None``/``'constant'`` or ``'cosine'``
            (m rises to ``final_momentum`` over ``total_steps`` updates).
        teacher_mode: ``'eval'`` (default) or ``'follow'``; ema_buffers: see the module docstring.

    Attributes:
        module: the EMA copy (``nn.Module``, ``nn.ModuleList`` or ``nn.ModuleDict``).
        num_updates: int64 buffer, the number of :meth:`update` calls so far.
    """

    def __init__(self,
                 student: StudentType,
                 momentum: float = 0.995,
                 momentum_schedule: Optional[str] = None,
                 final_momentum: float = 1.0,
                 total_steps: Optional[int] = None,
                 teacher_mode: str = 'eval',
                 ema_buffers: bool = False):
        super().__init__()
        _check_momentum('momentum', momentum)
        _check_momentum('final_momentum', final_momentum)
        if momentum_schedule not in (None, 'constant', 'cosine'):
            raise ValueError("momentum_schedule must be None, 'constant' or 'cosine', got "
                             f'{momentum_schedule!r}')
        if momentum_schedule == 'cosine' and (total_steps is None or int(total_steps) < 1):
            raise ValueError(f"momentum_schedule='cosine' needs total_steps >= 1, got {total_steps!r}")
        if teacher_mode not in ('eval', 'follow'):
            raise ValueError(f"teacher_mode must be 'eval' or 'follow', got {teacher_mode!r}")
        student_module = _as_module(student)
        self.base_momentum = float(momentum)
        self.momentum_schedule = momentum_schedule or 'constant'
        self.final_momentum = float(final_momentum)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.teacher_mode = teacher_mode
        self.ema_buffers = bool(ema_buffers)
        # A plain list, so the student is neither a submodule nor in this module's state_dict.
        self._student: List[nn.Module] = [student_module]
        self.module = copy.deepcopy(student_module)
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.register_counter('num_updates')
        self._own_pairs = None  # (params, buffers) of the student given at construction
        self.train(self.training)

    # ------------------------------------------------------------------ state
    @property
    def student(self) -> nn.Module:
        """The module the teacher follows (unwrapped)."""
        return self._student[0]

    def current_momentum(self, step: Optional[int] = None) -> float:
        """The momentum the next update (or update number ``step``, from 0) uses."""
        k = self.counter('num_updates') if step is None else int(step)
        if self.momentum_schedule == 'constant':
            return self.base_momentum
        if k >= self.total_steps:
            return self.final_momentum
        cos = (math.cos(math.pi * k / self.total_steps) + 1.0) / 2.0
        return self.final_momentum - (self.final_momentum - self.base_momentum) * cos

    def train(self, mode: bool = True) -> 'MomentumTeacher':
        super().train(mode)
        if self.teacher_mode == 'eval':
            self.module.eval()
        return self

    # ---------------------------------------------------------------- updates
    def _apply(self, *args, **kwargs):
        # .to()/.cuda() replace buffer tensors (and parameters, with some torch settings): match
        # the pairs again at the next update (the student is moved by the same parent call).
        self._own_pairs = None
        return super()._apply(*args, **kwargs)

    def _pairs(self, student: Optional[StudentType]):
        """(teacher, student) parameter and buffer pairs, matched by name and checked; those of
        the construction-time student are matched once and kept."""
        if student is None:
            if self._own_pairs is None:
                self._own_pairs = self._match(self.student)
            return self._own_pairs
        return self._match(_as_module(student))

    def _match(self, source: nn.Module):
        src_params = dict(source.named_parameters())
        dst_params = dict(self.module.named_parameters())
        if src_params.keys() != dst_params.keys():
            missing = sorted(dst_params.keys() - src_params.keys())[:5]
            extra = sorted(src_params.keys() - dst_params.keys())[:5]
            raise ValueError('student does not have the structure of the teacher: parameters '
                             f'missing from student {missing}, unexpected {extra}')
        for name, dst in dst_params.items():
            if dst.shape != src_params[name].shape:
                raise ValueError(f'student parameter {name!r} has shape {tuple(src_params[name].shape)}, '
                                 f'the teacher expects {tuple(dst.shape)}')
        src_buffers = dict(source.named_buffers())
        dst_buffers = dict(self.module.named_buffers())
        if src_buffers.keys() != dst_buffers.keys():
            raise ValueError('student does not have the buffers of the teacher: '
                             f'{sorted(src_buffers.keys() ^ dst_buffers.keys())[:5]}')
        return ([(dst, src_params[n]) for n, dst in dst_params.items()],
                [(dst, src_buffers[n]) for n, dst in dst_buffers.items()])

    @torch.no_grad()
    def update(self, student: Optional[StudentType] = None, momentum: Optional[float] = None) -> float:
        """One EMA step towards ``student`` (default: the module given at construction; another
        must have the same parameter names and shapes); ``momentum`` overrides the schedule.
        Returns the momentum used."""
        m = self.current_momentum() if momentum is None else float(momentum)
        _check_momentum('momentum', m)
        params, buffers = self._pairs(student)
        lerp = list(params)
        copy_pairs = []
        for dst, src in buffers:
            (lerp if self.ema_buffers and dst.is_floating_point() else copy_pairs).append((dst, src))
        if lerp:
            # lerp: dst + (1 - m) (src - dst) = m dst + (1 - m) src, all tensors at once
            dsts = [dst for dst, _ in lerp]
            srcs = [src.detach().to(device=dst.device, dtype=dst.dtype) for dst, src in lerp]
            torch._foreach_lerp_(dsts, srcs, 1.0 - m)
        for dst, src in copy_pairs:
            dst.copy_(src.detach())
        self.set_counter('num_updates', self.counter('num_updates') + 1)
        return m

    @torch.no_grad()
    def reset(self, student: Optional[StudentType] = None) -> None:
        """Copy the student's parameters and buffers exactly (e.g. after loading pretrained
        weights into the student). Does not change ``num_updates``."""
        params, buffers = self._pairs(student)
        for dst, src in params + buffers:
            dst.copy_(src.detach())

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        """Run the EMA copy without gradient; a sequence of modules is called in order
        (the first gets ``*args, **kwargs``, each next one the previous output)."""
        if isinstance(self.module, nn.ModuleDict):
            raise TypeError('this teacher follows a dict of modules: call teacher.run(name, ...) '
                            f'with name in {list(self.module.keys())}')
        with torch.no_grad():
            if isinstance(self.module, nn.ModuleList):
                out = self.module[0](*args, **kwargs)
                for part in list(self.module)[1:]:
                    out = part(out)
                return out
            return self.module(*args, **kwargs)

    def run(self, name: Union[str, int], *args, **kwargs):
        """Run one part (by key of a dict, or index of a sequence) of the EMA copy without gradient."""
        if not isinstance(self.module, (nn.ModuleDict, nn.ModuleList)):
            raise TypeError('run(name, ...) needs a teacher built from a list or dict of modules; '
                            'call the teacher directly')
        with torch.no_grad():
            return self.module[name](*args, **kwargs)

    def extra_repr(self) -> str:
        sched = '' if self.momentum_schedule == 'constant' else (
            f', schedule=cosine, final_momentum={self.final_momentum}, total_steps={self.total_steps}')
        return f'momentum={self.base_momentum}{sched}, teacher_mode={self.teacher_mode}'


def _check_momentum(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
        raise ValueError(f'{name} must be a number in [0, 1] (ALBEF convention: teacher = m * teacher '
                         f'+ (1 - m) * student), got {value!r}')
