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
from torch.nn import functional as F

from vlp_codebook import dist
from vlp_codebook.checks import check, check_finite, check_ids
from vlp_codebook.models.losses.functional import l2_normalize, ramped_alpha, soft_cross_entropy
from vlp_codebook.models.teachers.feature_queue import FeatureQueue
from vlp_codebook.registry import MODELS

__all__ = ['MultiDirectionalDistillationLoss', 'ramped_alpha', 'DIRECTIONS']

DIRECTIONS = ('t2i', 'i2t', 'i2i', 't2t')
# direction -> (query modality, key modality)
_MODALITIES = {'t2i': ('text', 'image'), 'i2t': ('image', 'text'),
               'i2i': ('image', 'image'), 't2t': ('text', 'text')}

QueueType = Union[None, torch.Tensor, FeatureQueue]


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
        _check_alpha(alpha)
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
            t = float(value)
            if not (math.isfinite(t) and t > 0):
                raise ValueError(f'state dict key {prefix}temperature = {t}: the distillation '
                                 'temperature must be a positive finite number')
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
        args = (image_feats, text_feats, image_teacher_feats, text_teacher_feats, image_queue, text_queue,
                image_ids, image_queue_ids, text_queue_ids, alpha, temperature)
        if self._lean_applies(*args):
            return self._lean_forward(*args)
        out = self._compute(*args)
        # Mean over this rank's queries; a rank with an empty batch contributes 0, not NaN.
        batch = next(iter(out.values()))[0].shape[0]
        weight = dist.batch_weight(batch, next(iter(out.values()))[0].device)
        return {f'loss_{direction}': soft_cross_entropy(logits, target) * (self.weights[direction] * weight)
                for direction, (logits, target) in out.items()}

    # ------------------------------------------------------------ lean path
    def _lean_applies(self, image_feats, text_feats, image_teacher_feats, text_teacher_feats, image_queue,
                      text_queue, *rest) -> bool:
        """The four directions, every feature given, queues of one length: all logits in one
        matrix product and one (2B, 2, N) softmax (:meth:`_lean_forward`)."""
        feats = (image_feats, text_feats, image_teacher_feats, text_teacher_feats)
        if self.directions != DIRECTIONS or not all(isinstance(f, torch.Tensor) for f in feats):
            return False
        if len({(f.dim(), f.shape, f.is_floating_point()) for f in feats}) != 1 or feats[0].dim() != 2:
            return False   # the general path raises the precise error
        if (image_queue is None) != (text_queue is None):
            return False
        if image_queue is not None:
            lengths = [len(q) if isinstance(q, FeatureQueue) else getattr(q, 'shape', (None,))[0]
                       for q in (image_queue, text_queue)]
            if lengths[0] != lengths[1]:
                return False
        return self.embed_dim is None or feats[0].shape[1] == self.embed_dim

    def _lean_queue(self, queue, queue_ids, name, dim, device):
        """Queue rows and ids for the lean path; a full FeatureQueue's storage as it is (the
        order of the keys does not change the loss)."""
        if isinstance(queue, FeatureQueue) and queue.is_full and queue_ids is None and queue.dim == dim:
            return queue.feats.to(device), (queue.ids.to(device) if queue.with_ids else None)
        return _queue_rows(queue, queue_ids, name, dim=dim, device=device, check=False)

    def _lean_forward(self, image_feats, text_feats, image_teacher_feats, text_teacher_feats, image_queue,
                      text_queue, image_ids, image_queue_ids, text_queue_ids, alpha, temperature):
        alpha = self.alpha if alpha is None else alpha
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.detach().float().reshape(())
            check((alpha >= 0) & (alpha <= 1),
                  lambda: ValueError(f'alpha must be a number in [0, 1], got {alpha.item()}'))
        else:
            _check_alpha(alpha)
        batch, dim = image_feats.shape
        device = image_feats.device
        inputs = {'image_feats': image_feats, 'text_feats': text_feats,
                  'image_teacher_feats': image_teacher_feats, 'text_teacher_feats': text_teacher_feats}
        queues = [self._lean_queue(image_queue, image_queue_ids, 'image_queue', dim, device),
                  self._lean_queue(text_queue, text_queue_ids, 'text_queue', dim, device)]
        for name, (feats, _) in zip(('image_queue', 'text_queue'), queues):
            inputs[name] = feats
        local = dist.local_slice(batch, device=device)
        gamma = self._gamma(temperature, check_value=False)
        with torch.autocast(device_type=device.type, enabled=False):
            prep = l2_normalize if self.normalize else (lambda x: x.float())
            with torch.no_grad():
                if dist.is_distributed():
                    joint_v, joint_t = dist.gather_no_grad(image_teacher_feats), dist.gather_no_grad(text_teacher_feats)
                else:
                    joint_v, joint_t = image_teacher_feats, text_teacher_feats
                # keys (2N, d): [teacher images (joint batch); image queue; teacher texts; text queue]
                keys = prep(torch.cat([joint_v.float(), queues[0][0].float(), joint_t.float(), queues[1][0].float()]))
                n_keys = keys.shape[0] // 2
                # Positives: keys with the query's instance id (or its own pair), both key blocks.
                if image_ids is None:
                    own = torch.arange(local.start, local.stop, device=device)
                    joint_ids = torch.arange(joint_v.shape[0], device=device)
                else:
                    check_ids('image_ids', image_ids, batch)
                    own = image_ids.to(device=device, dtype=torch.long)
                    joint_ids = dist.gather_no_grad(own)
                key_ids = torch.cat([joint_ids, _queue_key_ids(queues[0], image_ids is not None, device),
                                     joint_ids, _queue_key_ids(queues[1], image_ids is not None, device)])
                positives = (own.unsqueeze(1) == key_ids).float().view(batch, 2, n_keys)
                positives = positives.div_(positives.sum(dim=2, keepdim=True))
                # Teacher predictions of the same keys (queries: the teachers' own rows of keys).
                own_teacher = prep(torch.cat([image_teacher_feats, text_teacher_feats]).float())
                teacher_logits = (own_teacher @ keys.T).div_(gamma.detach()).view(2, batch, 2, n_keys)
                target = torch.lerp(positives, torch.softmax(teacher_logits, dim=3), alpha)
            students = prep(torch.cat([image_feats, text_feats]).float())       # rows: [z_v; z_t]
            logits = (students @ keys.T) / gamma
            # (query modality, row, key modality, key): [i2i, i2t; t2i, t2t]
            logp = F.log_softmax(logits.view(2, batch, 2, n_keys), dim=3)
            values = (target * logp).sum(dim=(1, 3)).view(4) * self._lean_scale(batch, device)
        check(torch.isfinite(values).all() & (gamma > 0),
              lambda: self._nonfinite_error(inputs, gamma, temperature))
        i2i, i2t, t2i, t2t = values.unbind()
        return {'loss_t2i': t2i, 'loss_i2t': i2t, 'loss_i2i': i2i, 'loss_t2t': t2t}

    def _lean_scale(self, batch: int, device) -> torch.Tensor:
        """Factors (i2i, i2t, t2i, t2t): ``-weight / B_rank * batch_weight``."""
        key = (batch, device, tuple(self.weights.items()))
        if getattr(self, '_scale_cache', None) is None or self._scale_cache[0] != key:
            self._scale_cache = (key, torch.tensor([-self.weights[d] / max(batch, 1)
                                                    for d in ('i2i', 'i2t', 't2i', 't2t')], device=device))
        weight = dist.batch_weight(batch, device)
        scale = self._scale_cache[1]
        return scale if isinstance(weight, float) else scale * weight

    def _nonfinite_error(self, inputs, gamma, temperature) -> Exception:
        for name, tensor in inputs.items():
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                return ValueError(f'{name} contains NaN or inf values ({bad} of {tensor.numel()} entries, '
                                  f'shape {tuple(tensor.shape)})')
        name = 'temperature' if temperature is not None else 'the loss\'s temperature'
        if not (bool(torch.isfinite(gamma)) and bool(gamma > 0)):
            return ValueError(f'{name} must be a positive finite number, got {gamma.detach().flatten().tolist()}')
        return ValueError('MultiDirectionalDistillationLoss: a loss is NaN or inf although every input is finite')

    def distributions(self, *args, **kwargs) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Same arguments as :meth:`forward`; returns ``{direction: (p, y)}``, the student's
        predicted distribution ``p`` and the target ``y``, both (B, B_joint + N_queue) fp32,
        keys ordered ``[teacher batch (rank 0 first); queue rows]``."""
        out = self._compute(*args, **kwargs)
        return {d: (F.softmax(logits, dim=1), target) for d, (logits, target) in out.items()}

    # ---------------------------------------------------------------- internal
    def _gamma(self, temperature, check_value: bool = True) -> torch.Tensor:
        if temperature is not None:
            if not isinstance(temperature, torch.Tensor):
                _check_temperature(temperature)
                return torch.tensor(float(temperature), device=self.temperature.device)
            gamma = temperature.float().to(self.temperature.device)  # keeps its gradient
            name = 'temperature'
        else:
            if self.temperature.requires_grad:
                with torch.no_grad():
                    self.temperature.clamp_(*self.temperature_range)
            gamma = self.temperature.float()
            name = 'the loss\'s temperature'
        if gamma.numel() != 1:
            raise ValueError(f'{name} must be a single number, got shape {tuple(gamma.shape)}')
        if not check_value:      # the caller folds the check into its own flag
            return gamma.reshape(())
        check(torch.isfinite(gamma).all() & (gamma > 0).all(),
              lambda: ValueError(f'{name} must be a positive finite number, got '
                                 f'{gamma.detach().flatten().tolist()}'))
        return gamma.reshape(())

    def _compute(self, image_feats=None, text_feats=None, image_teacher_feats=None,
                 text_teacher_feats=None, image_queue=None, text_queue=None, image_ids=None,
                 image_queue_ids=None, text_queue_ids=None, alpha=None, temperature=None):
        alpha = self.alpha if alpha is None else alpha
        if isinstance(alpha, torch.Tensor):
            alpha_tensor = alpha.detach().float().reshape(())
            check((alpha_tensor >= 0) & (alpha_tensor <= 1),
                  lambda: ValueError(f'alpha must be a number in [0, 1], got {alpha_tensor.item()}'))
        else:
            _check_alpha(alpha)
        # A tensor alpha is not read: the teacher targets are computed as if it were > 0.
        mixes_teacher = isinstance(alpha, torch.Tensor) or alpha > 0
        student = {'image': image_feats, 'text': text_feats}
        teacher = {'image': image_teacher_feats, 'text': text_teacher_feats}
        queues = {'image': (image_queue, image_queue_ids, 'image_queue'),
                  'text': (text_queue, text_queue_ids, 'text_queue')}

        # Which inputs the enabled directions need: the query's student features, the keys'
        # teacher features, and the query's teacher features when alpha > 0.
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
        given = {name: value for name, value in
                 (('image_feats', image_feats), ('text_feats', text_feats),
                  ('image_teacher_feats', image_teacher_feats), ('text_teacher_feats', text_teacher_feats))
                 if value is not None}
        dim, batch = _check_batch(given, self.embed_dim)
        device = next(iter(given.values())).device

        if image_ids is not None:
            check_ids('image_ids', image_ids, batch)
            joint_ids = dist.gather_no_grad(image_ids.to(device=device, dtype=torch.long))
            local = None
        else:
            joint_ids = None
            local = dist.local_slice(batch, device=device)

        gamma = self._gamma(temperature)
        with torch.autocast(device_type=device.type, enabled=False):
            prep = (lambda x: F.normalize(x.float(), dim=1)) if self.normalize else (lambda x: x.float())
            key_modalities = sorted({_MODALITIES[d][1] for d in self.directions})
            keys, positives = {}, {}
            for modality in key_modalities:
                teacher_joint = dist.gather_no_grad(teacher[modality])
                queue_feats, queue_ids = _queue_rows(*queues[modality], dim=dim, device=device)
                keys[modality] = prep(torch.cat([teacher_joint.float(), queue_feats.float()], dim=0))
                positives[modality] = _positives(batch, teacher_joint.shape[0], queue_feats.shape[0],
                                                 image_ids, joint_ids, queue_ids, local, device)
            out = {}
            for direction in self.directions:
                query, key = _MODALITIES[direction]
                logits = prep(student[query]) @ keys[key].T / gamma
                with torch.no_grad():
                    target = positives[key]
                    if mixes_teacher:
                        teacher_logits = prep(teacher[query].detach()) @ keys[key].T / gamma.detach()
                        target = alpha * F.softmax(teacher_logits, dim=1) + (1.0 - alpha) * target
                out[direction] = (logits, target)
        return out

    def extra_repr(self) -> str:
        learnable = isinstance(self.temperature, nn.Parameter)
        return (f'directions={self.directions}, weights={self.weights}, alpha={self.alpha}, '
                f'temperature={self.temperature.item():.4g} ({"learnable" if learnable else "fixed"}, '
                f'range {self.temperature_range})')


def _check_temperature(temperature) -> None:
    value = temperature
    if isinstance(temperature, torch.Tensor):
        value = float(temperature.detach().float().item())
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f'temperature must be a positive finite number, got {temperature!r}')


def _check_alpha(alpha) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f'alpha must be a number in [0, 1], got {alpha!r}')


def _check_batch(feats: Mapping[str, torch.Tensor], embed_dim: Optional[int]) -> Tuple[int, int]:
    """Check finite (B, d) tensors with one B and one d; return (d, B)."""
    dims, batches = {}, {}
    for name, value in feats.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            raise ValueError(f'{name} must be a floating 2-D tensor (batch, embed_dim), got '
                             f'{type(value).__name__} of shape {tuple(getattr(value, "shape", ()))}')
        check_finite(name, value)
        dims[name], batches[name] = value.shape[1], value.shape[0]
    if len(set(dims.values())) > 1 or (embed_dim is not None and set(dims.values()) != {embed_dim}):
        expected = f' (embed_dim={embed_dim})' if embed_dim is not None else ''
        raise ValueError(f'feature dimensions differ{expected}: {dims}')
    if len(set(batches.values())) > 1:
        raise ValueError('student and teacher features must hold the same B pairs, got batch sizes '
                         f'{batches}')
    return next(iter(dims.values())), next(iter(batches.values()))


def _queue_key_ids(queue: Tuple[torch.Tensor, Optional[torch.Tensor]], with_ids: bool, device) -> torch.Tensor:
    """Ids of a queue's rows as keys: their instance ids, or a value no query has (negatives)."""
    feats, ids = queue
    if with_ids and ids is not None:
        return ids
    return torch.full((feats.shape[0],), torch.iinfo(torch.long).min, dtype=torch.long, device=device)


def _queue_rows(queue: QueueType, queue_ids: Optional[torch.Tensor], name: str, dim: int,
                device: torch.device, check: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The (N, d) valid rows of a queue argument and their ids (or None)."""
    if queue is None:
        if queue_ids is not None:
            raise ValueError(f'{name}_ids given without {name}')
        return torch.zeros(0, dim, device=device), None
    if isinstance(queue, FeatureQueue):
        if queue_ids is not None:
            raise ValueError(f'{name} is a FeatureQueue, which brings its own ids: do not pass {name}_ids')
        if queue.dim != dim:
            raise ValueError(f'{name} holds features of dimension {queue.dim}, the features have {dim}')
        feats, queue_ids = queue.get()
    elif isinstance(queue, torch.Tensor):
        feats = queue
        if feats.dim() != 2 or feats.shape[1] != dim or not feats.is_floating_point():
            raise ValueError(f'{name} must be a floating (N, {dim}) tensor, got {feats.dtype} of '
                             f'shape {tuple(feats.shape)}')
        if queue_ids is not None:
            check_ids(f'{name}_ids', queue_ids, feats.shape[0])
    else:
        raise TypeError(f'{name} must be None, a (N, d) tensor or a FeatureQueue, got {type(queue).__name__}')
    if check:
        check_finite(name, feats)
    feats = feats.detach().to(device)
    return feats, (None if queue_ids is None else queue_ids.to(device=device, dtype=torch.long))


@torch.no_grad()
def _positives(batch: int, joint: int, num_queue: int, ids, joint_ids, queue_ids, local: Optional[slice],
               device) -> torch.Tensor:
    """(B, joint + num_queue) fp32 targets: the indicator of positives, rows normalised."""
    if ids is None:
        target = torch.zeros(batch, joint + num_queue, device=device)
        target[torch.arange(batch, device=device), torch.arange(local.start, local.stop, device=device)] = 1.0
        return target
    ids = ids.to(device=device, dtype=torch.long)
    key_ids = joint_ids if queue_ids is None else torch.cat([joint_ids, queue_ids])
    match = (ids[:, None] == key_ids[None, :]).float()
    if queue_ids is None and num_queue:
        match = torch.cat([match, match.new_zeros(batch, num_queue)], dim=1)
    # Every row has at least its own pair, so the sum is >= 1.
    return match / match.sum(dim=1, keepdim=True)
