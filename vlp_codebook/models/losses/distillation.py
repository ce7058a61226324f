r"""Multi-directional teacher-student distillation: CODIS's :math:`L_{align}`.

Duan et al., "Multi-modal Alignment using Representation Codebook", CVPR 2022, "Part 2".

Image and text are two views of one instance. Student embeddings :math:`z_v, z_t` (queries)
are contrasted against momentum-teacher embeddings (keys): the current teacher batch
:math:`z^m` plus a queue :math:`Q` of earlier teacher batches. With temperature :math:`\gamma`:

.. math::
    p_{t2i} &= \mathrm{softmax}(z_t\,[z_v^m; Q_v]^\top / \gamma), &
    p_{i2t} &= \mathrm{softmax}(z_v\,[z_t^m; Q_t]^\top / \gamma), \\
    p_{i2i} &= \mathrm{softmax}(z_v\,[z_v^m; Q_v]^\top / \gamma), &
    p_{t2t} &= \mathrm{softmax}(z_t\,[z_t^m; Q_t]^\top / \gamma).

The cross directions t2i/i2t are ALBEF's ITC, the intra directions i2i/t2t TCL's. Targets
(ALBEF momentum distillation), with :math:`\bar y` the positives' indicator normalised to sum to 1
(the paired teacher entry and, given instance ids, every key with the query's id) and
:math:`p^m` the teacher's own prediction (the teacher embedding of the query's modality, same
keys and :math:`\gamma`, no gradient):

.. math::
    y = \alpha\, p^{m} + (1 - \alpha)\, \bar y, \qquad
    L_{dir} = -\frac{1}{B}\sum_{i=1}^{B} \sum_j y_{ij} \log p_{ij}, \qquad
    L_{align} = \sum_{dir} w_{dir} L_{dir}.

:math:`\gamma` is an ``nn.Parameter`` (init 0.07) clamped to ``temperature_range`` before every
forward (a buffer with ``learnable_temperature=False``; ``forward(temperature=t)`` uses an external
one); one that is not positive and finite is an error, never a NaN loss. Value checks go through
:mod:`vlp_codebook.checks` (one host read per step inside CODIS). Everything runs in fp32 with
autocast off. Under DDP the keys' batch part is the joint teacher batch and each rank's loss is
scaled by :func:`vlp_codebook.dist.batch_weight`, so DDP's gradient average is the joint batch's
gradient. The defaults, the slide's :math:`p_{t2t}` typo and the DDP convention are in
docs/teacher_and_distillation.md.

Example::

    >>> import torch
    >>> from torch.nn.functional import normalize
    >>> from vlp_codebook.registry import MODELS
    >>> loss_fn = MODELS.build(dict(type='MultiDirectionalDistillationLoss'))
    >>> zv, zt = normalize(torch.randn(8, 32), dim=1), normalize(torch.randn(8, 32), dim=1)
    >>> zv_m = normalize(zv + 0.1 * torch.randn(8, 32), dim=1)    # teacher features
    >>> zt_m = normalize(zt + 0.1 * torch.randn(8, 32), dim=1)
    >>> Qv, Qt = normalize(torch.randn(100, 32), dim=1), normalize(torch.randn(100, 32), dim=1)
    >>> losses = loss_fn(image_feats=zv, text_feats=zt, image_teacher_feats=zv_m,
    ...                  text_teacher_feats=zt_m, image_queue=Qv, text_queue=Qt, alpha=0.4)
    >>> sorted(losses)
    ['loss_i2i', 'loss_i2t', 'loss_t2i', 'loss_t2t']
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from vlp_codebook import dist
from vlp_codebook.checks import check
from vlp_codebook.models.losses.functional import l2_normalize, ramped_alpha
from vlp_codebook.models.losses.distillation_layout import MODALITIES as _MODALITIES, Grid, QueueType, check_batch
from vlp_codebook.registry import MODELS

__all__ = ['MultiDirectionalDistillationLoss', 'ramped_alpha', 'DIRECTIONS']

DIRECTIONS = ('t2i', 'i2t', 'i2i', 't2t')


@MODELS.register_module()
class MultiDirectionalDistillationLoss(nn.Module):
    """Contrastive distillation from momentum teachers in the directions t2i, i2t, i2i, t2t.

    ``directions``: a non-empty subset of ``('t2i', 'i2t', 'i2i', 't2t')`` (paper ablation row a:
    ``('t2i', 'i2t')``; row b: all four, the default). ``direction_weights`` (missing keys 1.0) and
    ``loss_weight`` multiply the directions. ``alpha`` is the default α of ``forward`` (a device
    tensor is taken without a host read). ``normalize`` L2-normalises every feature;
    ``embed_dim``, if given, is required of every feature.
    """

    def __init__(self,
                 directions: Sequence[str] = DIRECTIONS,
                 direction_weights: Optional[Mapping[str, float]] = None,
                 loss_weight: float = 1.0,
                 temperature: float = 0.07,
                 learnable_temperature: bool = True,
                 temperature_range: Tuple[float, float] = (0.001, 0.5),
                 alpha: float = 0.4,
                 normalize: bool = True,
                 embed_dim: Optional[int] = None):
        super().__init__()
        if isinstance(directions, str):
            directions = (directions,)
        unknown = [d for d in directions if d not in DIRECTIONS]
        if unknown or not directions:
            raise ValueError(f'directions must be a non-empty subset of {list(DIRECTIONS)}, got '
                             f'{list(directions)}')
        direction_weights = dict(direction_weights or {})
        bad = sorted(set(direction_weights) - set(DIRECTIONS))
        if bad:
            raise ValueError(f'direction_weights has unknown keys {bad}; known: {list(DIRECTIONS)}')
        lo, hi = (float(x) for x in temperature_range)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError('temperature_range must be (min, max) with 0 < min <= max, got '
                             f'{temperature_range}')
        _check_temperature(temperature)
        _alpha(alpha)
        # Fixed order, whatever the order given.
        self.directions = tuple(d for d in DIRECTIONS if d in directions)
        self.weights = {d: float(direction_weights.get(d, 1.0)) * float(loss_weight) for d in self.directions}
        self.temperature_range = (lo, hi)
        self.alpha = float(alpha)
        self.normalize = bool(normalize)
        self.embed_dim = embed_dim
        init = torch.tensor(float(temperature)).clamp(lo, hi)
        if learnable_temperature:
            self.temperature = nn.Parameter(init)
        else:
            self.register_buffer('temperature', init)

    def ramped_alpha(self, iteration: int, iterations_per_epoch: int, epoch: int = 0) -> float:
        """:func:`~vlp_codebook.models.losses.functional.ramped_alpha` with this loss's ``alpha``."""
        if iterations_per_epoch < 1:
            raise ValueError(f'iterations_per_epoch must be >= 1, got {iterations_per_epoch}')
        return ramped_alpha(self.alpha, iteration, iterations_per_epoch, epoch)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A temperature of 0, negative or NaN would make every logit inf/NaN: refuse it here,
        # naming the key, rather than train on NaN losses.
        value = state_dict.get(prefix + 'temperature')
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            _check_temperature(value, f'state dict key {prefix}temperature = {float(value)}: the distillation '
                                      'temperature')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ public
    def forward(self,
                image_feats: Optional[torch.Tensor] = None,
                text_feats: Optional[torch.Tensor] = None,
                image_teacher_feats: Optional[torch.Tensor] = None,
                text_teacher_feats: Optional[torch.Tensor] = None,
                image_queue: QueueType = None,
                text_queue: QueueType = None,
                image_ids: Optional[torch.Tensor] = None,
                image_queue_ids: Optional[torch.Tensor] = None,
                text_queue_ids: Optional[torch.Tensor] = None,
                alpha: Optional[float] = None,
                temperature: Union[None, float, torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The enabled directions' losses ``{'loss_t2i', ...}``: fp32 scalars, weighted, each the mean
        over this rank's queries times :func:`vlp_codebook.dist.batch_weight`.

        Features are (B, d): students ``z_v, z_t`` (queries), teachers ``z_v^m, z_t^m`` (keys, and
        the teacher queries of the targets). A queue is None, an (N, d) tensor of valid rows or a
        :class:`FeatureQueue` (its valid rows and ids), with its content *before* the current batch
        is enqueued. ``image_ids`` (B,): every key with the query's id is a positive (None: only
        the paired entry); queue rows without ids are negatives. ``alpha`` in [0, 1] and
        ``temperature`` > 0 override the loss's own.
        """
        grid = self._compute(image_feats, text_feats, image_teacher_feats, text_teacher_feats, image_queue,
                             text_queue, image_ids, image_queue_ids, text_queue_ids, alpha, temperature)
        with torch.autocast(device_type=grid.gamma.device.type, enabled=False):
            logp = grid.log_softmax(grid.logits)
            # (query modality, key modality) cells, weighted; 0 for a cell no direction uses.
            values = (grid.target * logp).sum(dim=(1, 3)).view(-1) * self._scale(grid)
        check(torch.isfinite(values).all() & (grid.gamma > 0), grid.error)
        cells = values.unbind()
        return {f'loss_{d}': cells[grid.cells.index(_MODALITIES[d])] for d in self.directions}

    def distributions(self, *args, **kwargs) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Same arguments as :meth:`forward`; returns ``{direction: (p, y)}``, the student's
        predicted distribution ``p`` and the target ``y``, both (B, B_joint + N_queue) fp32,
        keys ordered ``[teacher batch (rank 0 first); queue rows]``."""
        grid = self._compute(*args, **kwargs)
        p = grid.log_softmax(grid.logits).exp()
        check(torch.isfinite(p).all() & (grid.gamma > 0), grid.error)
        target = grid.target.expand_as(p)
        out = {}
        for d in self.directions:
            q, c = divmod(grid.cells.index(_MODALITIES[d]), p.shape[2])
            n = grid.lengths[_MODALITIES[d][1]]
            out[d] = (p[q, :, c, :n], target[q, :, c, :n])
        return out

    # ---------------------------------------------------------------- internal
    def _scale(self, grid: Grid) -> torch.Tensor:
        """Per cell: ``-weight / B_rank * batch_weight`` (0 for an unused cell), cached."""
        batch, device = grid.batch, grid.gamma.device
        key = (batch, device, grid.cells, tuple(self.weights.items()))
        if getattr(self, '_scale_cache', None) is None or self._scale_cache[0] != key:
            weights = {_MODALITIES[d]: w for d, w in self.weights.items()}
            self._scale_cache = (key, torch.tensor([-weights.get(cell, 0.0) / max(batch, 1) for cell in grid.cells],
                                                   device=device))
        weight = dist.batch_weight(batch, device)
        scale = self._scale_cache[1]
        return scale if isinstance(weight, float) else scale * weight

    def _gamma(self, temperature) -> torch.Tensor:
        """γ as a device scalar; its value is checked with the loss values (one fused flag)."""
        if temperature is None:
            if self.temperature.requires_grad:
                with torch.no_grad():
                    self.temperature.clamp_(*self.temperature_range)
            gamma = self.temperature.float()
        elif isinstance(temperature, torch.Tensor):
            gamma = temperature.float().to(self.temperature.device)  # keeps its gradient
        else:
            _check_temperature(temperature)
            return torch.tensor(float(temperature), device=self.temperature.device)
        if gamma.numel() != 1:
            raise ValueError(f'temperature must be a single number, got shape {tuple(gamma.shape)}')
        return gamma.reshape(())

    def _compute(self, image_feats=None, text_feats=None, image_teacher_feats=None,
                 text_teacher_feats=None, image_queue=None, text_queue=None, image_ids=None,
                 image_queue_ids=None, text_queue_ids=None, alpha=None, temperature=None) -> Grid:
        """Student logits and targets of every (query modality, key modality) cell the
        directions need, in one product; see :class:`~vlp_codebook.models.losses.distillation_layout.Grid`."""
        alpha = _alpha(self.alpha if alpha is None else alpha)
        student = {'image': image_feats, 'text': text_feats}
        teacher = {'image': image_teacher_feats, 'text': text_teacher_feats}
        # A tensor alpha is not read: the teacher targets are computed as if it were > 0.
        mixes_teacher = isinstance(alpha, torch.Tensor) or alpha > 0
        inputs = self._inputs(student, teacher, mixes_teacher, alpha)
        dim, batch = check_batch(inputs, self.embed_dim)
        device = next(iter(inputs.values())).device
        queues = {'image': (image_queue, image_queue_ids), 'text': (text_queue, text_queue_ids)}
        grid = Grid(self.directions, batch, device, self._gamma(temperature), inputs, temperature)
        with torch.autocast(device_type=device.type, enabled=False):
            prep = l2_normalize if self.normalize else (lambda x: x.float())
            with torch.no_grad():
                keys, key_ids, own = grid.keys(teacher, queues, image_ids, dim, prep)
                positives = (own.unsqueeze(1) == key_ids).float()
                positives = positives.view(-1, batch, grid.width, grid.length)
                positives = positives.div_(positives.sum(dim=3, keepdim=True))
                if mixes_teacher:
                    queries = prep(torch.cat([teacher[q] for q in grid.queries]).float())
                    teacher_logits = grid.product(queries, keys).div_(grid.gamma.detach())
                    target = torch.lerp(positives, grid.softmax(teacher_logits), alpha)
                else:
                    target = positives
            queries = prep(torch.cat([student[q] for q in grid.queries]).float())
            grid.logits = grid.product(queries, keys) / grid.gamma
        grid.target = target
        return grid

    def _inputs(self, student, teacher, mixes_teacher, alpha) -> Dict[str, torch.Tensor]:
        """The features the directions need: the queries' student features, the keys' teacher
        features and, when α > 0, the queries' teacher features."""
        needed = {}
        for direction in self.directions:
            query, key = _MODALITIES[direction]
            needed[f'{query}_feats'] = student[query]
            needed[f'{key}_teacher_feats'] = teacher[key]
            if mixes_teacher:
                needed[f'{query}_teacher_feats'] = teacher[query]
        missing = [name for name, value in needed.items() if value is None]
        if missing:
            raise ValueError(f'directions {list(self.directions)} with alpha={alpha} need {missing}, '
                             'which were not given')
        order = ('image_feats', 'text_feats', 'image_teacher_feats', 'text_teacher_feats')
        return {name: needed[name] for name in order if name in needed}

    def extra_repr(self) -> str:
        learnable = isinstance(self.temperature, nn.Parameter)
        return (f'directions={self.directions}, weights={self.weights}, alpha={self.alpha}, '
                f'temperature={self.temperature.item():.4g} ({"learnable" if learnable else "fixed"}, '
                f'range {self.temperature_range})')


def _check_temperature(temperature, name: str = 'temperature') -> None:
    value = float(temperature.detach().float()) if isinstance(temperature, torch.Tensor) else temperature
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f'{name} must be a positive finite number, got {temperature!r}')


def _alpha(alpha):
    """α as given, checked: a number in [0, 1], or a device scalar checked with the values."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.detach().float().reshape(())
        check((alpha >= 0) & (alpha <= 1), lambda: ValueError(f'alpha must be a number in [0, 1], got {alpha.item()}'))
    elif not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f'alpha must be a number in [0, 1], got {alpha!r}')
    return alpha
