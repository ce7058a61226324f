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

(The slides' :math:`p_{t2t}` denominator shows :math:`z_v^{m'}`; it is the text queue.)
The cross directions t2i/i2t are ALBEF's ITC (Li et al., NeurIPS 2021), the intra directions
i2i/t2t TCL's (Yang et al., CVPR 2022).

**Targets** (ALBEF momentum distillation). The positives of query :math:`i` are its paired
teacher entry and, when instance ids are given, every key (batch or queue) with the same id
(several captions of one image); :math:`\bar y` is the indicator of positives normalised to sum
to 1. The teacher's own prediction uses the *teacher* embedding of the query's modality against
the same keys and the same :math:`\gamma` (no gradient); for t2i it is
:math:`\mathrm{softmax}(z_t^m [z_v^m; Q_v]^\top/\gamma)`. Then

.. math::
    y = \alpha\, p^{m} + (1 - \alpha)\, \bar y, \qquad
    L_{dir} = -\frac{1}{B}\sum_{i=1}^{B} \sum_j y_{ij} \log p_{ij}, \qquad
    L_{align} = \sum_{dir} w_{dir} L_{dir}.

ALBEF ramps :math:`\alpha = 0.4` linearly over the first epoch:
:func:`~vlp_codebook.models.losses.functional.ramped_alpha`.

**Temperature.** :math:`\gamma` is an ``nn.Parameter`` of this loss (init 0.07) clamped in place
to ``temperature_range`` (ALBEF: [0.001, 0.5]) before every forward; ``learnable_temperature=False``
keeps it fixed (a buffer); ``forward(..., temperature=t)`` uses an external one (e.g. shared
with another loss). A temperature that is not positive and finite (e.g. a fixed one of 0 loaded
from a state dict) is an error, at loading and in ``forward``, never a NaN loss.

**Value checks** (NaN/inf features and queues, the temperature, a tensor α) go through
:mod:`vlp_codebook.checks`: read at once when the loss is called on its own, one read per step
inside CODIS's ``deferred_checks`` block.

**Numerics.** Everything runs in fp32 with autocast disabled; ``log_softmax`` and ``softmax``
subtract the row maximum. Inputs are L2-normalised (``normalize=True``; idempotent for
features that already are).

**DDP.** Each rank passes its own batch. The batch part of the keys is the *joint* teacher
batch (:func:`vlp_codebook.dist.gather_no_grad`, rank 0 first; local batch sizes may differ),
the positive of local query ``i`` is key ``start + i`` where ``start`` is this rank's offset
(:func:`vlp_codebook.dist.local_slice`), and the queue is the same on every rank
(:class:`~vlp_codebook.models.teachers.FeatureQueue` gathers before enqueuing). Each rank's loss
is the mean over its ``B_r`` local queries, so with local batch sizes ``B_r`` and joint size ``B``:
the joint-batch loss is :math:`\sum_r (B_r/B) L_r` (the mean over ranks when the ``B_r`` are
equal), and the gradient of :math:`L_r` on rank r's student features is ``B / B_r`` times (``world_size``
times, for equal ``B_r``) the gradient of the joint loss on those rows -- which DDP's average over
ranks turns back into the joint gradient for the parameters.

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

    Args:
        directions: the enabled directions, a subset of ``('t2i', 'i2t', 'i2i', 't2t')``
            (paper ablation: ``('t2i', 'i2t')`` = row a, all four = row b, the default).
        direction_weights: per-direction weights (missing keys: 1.0).
        loss_weight: multiplies every direction.
        temperature: initial γ > 0. Default 0.07 (ALBEF, CODIS).
        learnable_temperature: γ is an ``nn.Parameter`` (default) or a fixed buffer.
        temperature_range: (min, max) γ is clamped to before each forward. Default (0.001, 0.5).
        alpha: default α when ``forward`` gets none. Default 0.4 (ALBEF); ramp it with
            :meth:`ramped_alpha`. A device tensor is taken without a host read (and is
            checked with the other values).
        normalize: L2-normalise every feature (queries, teacher features, queues).
        embed_dim: if given, every feature must have this dimension.
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
        """The enabled directions' losses.

        Args:
            image_feats: (B, d) student image embeddings z_v (queries of i2t, i2i).
            text_feats: (B, d) student text embeddings z_t of the paired captions (t2i, t2t).
            image_teacher_feats: (B, d) momentum-teacher image embeddings z_v^m (keys of t2i,
                i2i; the teacher query of i2t, i2i).
            text_teacher_feats: (B, d) z_t^m.
            image_queue: Q_v -- None (no queue), an (N_v, d) tensor of valid rows, or a
                :class:`FeatureQueue` (its valid rows and, if kept, ids). Its content *before*
                the current batch is enqueued.
            text_queue: Q_t, likewise.
            image_ids: (B,) integer instance id of each pair (e.g. the image id, shared by its
                captions). Every key with the query's id is a positive. None: only the paired
                entry is.
            image_queue_ids: (N_v,) ids of a tensor ``image_queue`` (a FeatureQueue brings its
                own). Without ids, queue entries are negatives.
            text_queue_ids: (N_t,) likewise.
            alpha: α in [0, 1], weight of the teacher's softmax in the targets (default: the
                constructor's ``alpha``).
            temperature: use this γ > 0 instead of the loss's own.

        Returns:
            ``{'loss_t2i', 'loss_i2t', 'loss_i2i', 'loss_t2t'}`` restricted to the enabled
            directions: fp32 scalars, weighted, each the mean over this rank's queries times
            ``B_rank * world / B_joint`` (:func:`vlp_codebook.dist.batch_weight`; 1 on one
            process and with equal batches), so that DDP's average of the gradients is the
            joint batch's gradient.
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
