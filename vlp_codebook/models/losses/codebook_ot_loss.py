r"""The CODIS codebook loss :math:`L_{code}` (Duan et al., CVPR 2022, "Part 1").

For each modality the features are transported to the codebook by entropic OT
(:func:`vlp_codebook.ot.sinkhorn`, cost :math:`M_{ik} = 1 - z_i \cdot c_k`, uniform marginals,
no gradient). Row-normalised, the plans :math:`q^v = B\,T_{i2p}` and :math:`q^t = B\,T_{t2p}`
are assignment distributions over codewords. With the student predictions
:math:`p^v = \mathrm{softmax}(z_v C^\top / \tau)`, :math:`p^t = \mathrm{softmax}(z_t C^\top / \tau)`:

.. math::
    L_{i2p} &= -\tfrac{1}{B}\textstyle\sum_i \sum_k q^t_{ik} \log p^v_{ik}
        \quad\text{(image predicts the text's assignment)} \\
    L_{t2p} &= -\tfrac{1}{B}\textstyle\sum_i \sum_k q^v_{ik} \log p^t_{ik} \\
    L_{ot,v} &= \langle T_{i2p}, 1 - \tilde Z_v C^\top \rangle, \qquad
    L_{ot,t} = \langle T_{t2p}, 1 - \tilde Z_t C^\top \rangle \\
    L_{code} &= L_{t2p} + L_{i2p} + L_{ot,t} + L_{ot,v}

The swapped prediction is SwAV's (Caron et al., NeurIPS 2020) across modalities. The plans
come from ``*_plan_feats`` when given (the paper's best: momentum-teacher features), else from
the students -- the "teacher feature" / "student feature" ablation. :math:`\tilde Z`
(``ot_cost_features``, which the paper leaves open) is the plans' own detached features
(``'plan'``, default: :math:`L_{ot}` moves only the codebook), the students' (``'student'``) or
nothing (``'off'``); docs/ot_and_codebook.md gives the evidence. The gradient never reaches the
plans. Everything is fp32 whatever the autocast dtype.

Under DDP each rank passes its own rows: the plans are those of the joint batch (the solver
all-reduces its column sums), and each term is this rank's mean times ``dist.batch_weight``
(``B_r * world / B``), so DDP's gradient average is the joint batch's. Both modalities share one
``(2B, K)`` pass and one fused finiteness flag (op budget: ``tests/test_op_budgets.py``); inside
``torch.compile`` the solve is one opaque operator (``fullgraph=True`` compiles).

Example::

    >>> import torch
    >>> from vlp_codebook.registry import MODELS
    >>> loss_fn = MODELS.build(dict(type='CodebookOTLoss', num_codewords=64, embed_dim=32))
    >>> zv = torch.nn.functional.normalize(torch.randn(16, 32), dim=1).requires_grad_()
    >>> zt = torch.nn.functional.normalize(torch.randn(16, 32), dim=1).requires_grad_()
    >>> losses = loss_fn(zv, zt)             # dict: loss_i2p, loss_t2p, loss_ot_v, loss_ot_t
    >>> sum(losses.values()).backward()
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from vlp_codebook import dist
from vlp_codebook.checks import check, nonfinite_error
from vlp_codebook.models.codebook import Codebook, check_features
from vlp_codebook.models.host_counters import HostCounters
from vlp_codebook.models.losses.functional import l2_normalize
from vlp_codebook.models.teachers.feature_queue import FeatureQueue
from vlp_codebook.ot import sinkhorn
from vlp_codebook.registry import MODELS

__all__ = ['CodebookOTLoss', 'OT_COST_FEATURES']

TERMS = ('i2p', 't2p', 'ot_v', 'ot_t')


@torch.library.custom_op('vlp_codebook::sinkhorn_assignments', mutates_args=())
def _assign_op(cost: torch.Tensor, epsilon: float, tol: float, max_iters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-normalised Sinkhorn plan and ``[iterations, marginal error]``: the solver as one
    operator for ``torch.compile`` (its convergence loop reads the device, which a graph cannot)."""
    plan, info = sinkhorn(cost, epsilon, tol=tol, max_iters=max_iters, return_info=True, row_normalized=True)
    return plan, torch.tensor([float(info.iterations), info.marginal_error], device=cost.device)


@_assign_op.register_fake
def _(cost, epsilon, tol, max_iters):
    return cost.new_empty(cost.shape, dtype=torch.float32), cost.new_empty(2, dtype=torch.float32)
OT_COST_FEATURES = ('plan', 'student', 'off')


@MODELS.register_module()
class CodebookOTLoss(HostCounters, nn.Module):
    r"""Codebook optimal-transport loss with its own :class:`Codebook`.

    Args:
        num_codewords: K (when ``codebook`` is not given). Default 1024; see ``docs/ot_and_codebook.md``.
        embed_dim: d (when ``codebook`` is not given).
        codebook: a :class:`Codebook`, or its config dict; overrides ``num_codewords``/``embed_dim``.
        epsilon: entropic regularisation ε of the plans (cosine-cost units). Default 0.05 (SwAV).
        temperature: τ of the codeword softmax. Default 0.1 (SwAV).
        sinkhorn_tol: L1 marginal error the plans are solved to. Default 1e-4.
        sinkhorn_max_iters: cap on Sinkhorn iterations. Default 500.
        loss_weight: multiplies every term (the ablation's "0.5x / 2.0x codebook").
        term_weights: per-term weights, keys ``i2p, t2p, ot_v, ot_t`` (missing keys: 1.0). A
            term of weight 0 is neither computed nor returned.
        ot_cost_features: what the :math:`L_{ot}` terms transport: ``'plan'`` (default; the plans'
            own features, detached: only the codebook gets their gradient), ``'student'`` (the
            student features, which are pulled towards codewords too) or ``'off'`` (no
            :math:`L_{ot}`). Chosen by ``benchmarks/real_data_ablation.py``.
        codeword_init_norm: ``init_norm`` of the codebook built here (when ``codebook`` is not
            given): ``1.0`` (default) = unit-norm codewords, which turn about :math:`\sqrt{d}`
            ``lr`` radians per Adam step; ``None`` = N(0, 1) entries (about ``lr`` radians per
            step, :math:`\sqrt{d}` times slower). Chosen on real data by the rule of
            ``benchmarks/real_data_ablation.py`` (docs/ot_and_codebook.md). See
            :class:`~vlp_codebook.models.codebook.Codebook`.
        plan_queue_size: rows of past plan features kept per modality (0: off). Each solve
            transports [this batch; the queued rows] to the codebook and only the batch's rows
            become targets, so a batch smaller than K still gets peaked plans (SwAV's queue for
            small batches). Under DDP every rank holds the joint queue and transports its share.
        warmup_steps: training steps at the start during which every term is zero (the plan
            queue fills meanwhile); the step count is saved in the state dict.
        track_usage: in training mode, update the codebook's usage EMA with the students'
            predicted codeword mass and record ``code_perplexity`` / ``code_plan_perplexity`` in
            ``last_stats`` (see docs/ot_and_codebook.md).
    """

    def __init__(self,
                 num_codewords: int = 1024,
                 embed_dim: int = 256,
                 codebook: Union[None, Codebook, Mapping] = None,
                 epsilon: float = 0.05,
                 temperature: float = 0.1,
                 sinkhorn_tol: float = 1e-4,
                 sinkhorn_max_iters: int = 500,
                 loss_weight: float = 1.0,
                 term_weights: Optional[Mapping[str, float]] = None,
                 ot_cost_features: str = 'plan',
                 codeword_init_norm: Optional[float] = 1.0,
                 plan_queue_size: int = 0,
                 warmup_steps: int = 0,
                 track_usage: bool = True):
        super().__init__()
        if ot_cost_features not in OT_COST_FEATURES:
            raise ValueError(f'ot_cost_features must be one of {list(OT_COST_FEATURES)}, got {ot_cost_features!r}')
        if codebook is None:
            codebook = Codebook(num_codewords=num_codewords, embed_dim=embed_dim, init_norm=codeword_init_norm)
        elif isinstance(codebook, Mapping):
            codebook = MODELS.build(dict(codebook))
        if not isinstance(codebook, Codebook):
            raise TypeError(f'codebook must be a Codebook or its config dict, got {type(codebook).__name__}')
        if not (epsilon > 0 and temperature > 0):
            raise ValueError(f'epsilon and temperature must be > 0, got epsilon={epsilon}, '
                             f'temperature={temperature}')
        term_weights = dict(term_weights or {})
        unknown = set(term_weights) - set(TERMS)
        if unknown:
            raise ValueError(f'term_weights has unknown keys {sorted(unknown)}; known: {list(TERMS)}')
        self.codebook = codebook
        self.epsilon = float(epsilon)
        self.temperature = float(temperature)
        self.sinkhorn_tol = float(sinkhorn_tol)
        self.sinkhorn_max_iters = int(sinkhorn_max_iters)
        self.loss_weight = float(loss_weight)
        self.ot_cost_features = ot_cost_features
        if ot_cost_features == 'off':
            term_weights.update(ot_v=0.0, ot_t=0.0)
        self.term_weights = {t: float(term_weights.get(t, 1.0)) * self.loss_weight for t in TERMS}
        self.track_usage = track_usage
        for name, value in (('plan_queue_size', plan_queue_size), ('warmup_steps', warmup_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f'{name} must be an integer >= 0, got {value!r}')
        # Buffers only where the option is on, so state dicts of the plain loss keep their keys.
        self.plan_queue_size = plan_queue_size
        self.plan_queues = None
        if plan_queue_size:
            self.plan_queues = nn.ModuleDict({m: FeatureQueue(plan_queue_size, codebook.embed_dim)
                                              for m in ('image', 'text')})
        self.warmup_steps = warmup_steps
        if warmup_steps:
            self.register_counter('num_steps')
        self.last_stats: Dict[str, Union[float, torch.Tensor]] = {}
        self._scale_cache = None

    @property
    def enabled_terms(self):
        return tuple(t for t in TERMS if self.term_weights[t] != 0)

    @torch.no_grad()
    def assignments(self, plan_feats: torch.Tensor, name: str = 'plan_feats') -> torch.Tensor:
        """Row-normalised OT plan (N, K) of ``plan_feats`` to the codebook: each row sums to 1."""
        check_features(name, plan_feats, self.codebook.embed_dim)
        return self._assign(self.codebook.cost(plan_feats), name)

    @torch.no_grad()
    def _assign(self, cost: torch.Tensor, name: str) -> torch.Tensor:
        """The row-normalised plan (each row sums to 1) of ``cost``."""
        if torch.compiler.is_compiling():
            # One opaque operator in the graph: the solve runs eagerly to its tolerance.
            plan, stats = _assign_op(cost, self.epsilon, self.sinkhorn_tol, self.sinkhorn_max_iters)
            self.last_stats[f'sinkhorn_iters_{name}'] = stats[0]
            self.last_stats[f'sinkhorn_err_{name}'] = stats[1]
            return plan
        plan, info = sinkhorn(cost, self.epsilon, max_iters=self.sinkhorn_max_iters, tol=self.sinkhorn_tol,
                              return_info=True, row_normalized=True)
        self.last_stats[f'sinkhorn_iters_{name}'] = float(info.iterations)
        self.last_stats[f'sinkhorn_err_{name}'] = info.marginal_error
        return plan

    def forward(self,
                image_feats: torch.Tensor,
                text_feats: torch.Tensor,
                image_plan_feats: Optional[torch.Tensor] = None,
                text_plan_feats: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Compute the enabled terms.

        Args:
            image_feats: (B, d) student image embeddings (normalised here).
            text_feats: (B, d) student text embeddings of the paired captions.
            image_plan_feats: (B, d) features the image plan is computed from (e.g. the
                momentum teacher's); default ``image_feats``.
            text_plan_feats: (B, d) likewise for text.

        Returns:
            ``{'loss_i2p', 'loss_t2p', 'loss_ot_v', 'loss_ot_t'}`` (enabled terms only), fp32
            scalars, already weighted; under ``torch.distributed`` each is this rank's mean
            times ``B_rank * world / B_joint`` (:func:`vlp_codebook.dist.batch_weight`), so DDP's
            average of the gradients is the joint batch's gradient. During the first
            ``warmup_steps`` training steps every term is a zero that still reaches the codebook
            (so DDP sees a gradient for it).
        """
        inputs = self._check_inputs(image_feats, text_feats, image_plan_feats, text_plan_feats)
        B = image_feats.shape[0]
        terms = self.enabled_terms
        ce_terms = 'i2p' in terms or 't2p' in terms
        ot_terms = 'ot_v' in terms or 'ot_t' in terms
        warming_up = self.warmup_steps > 0 and self.training and self.counter('num_steps') < self.warmup_steps
        with torch.autocast(device_type=image_feats.device.type, enabled=False):
            codewords_t = self.codebook().t()                            # (d, K) fp32
            # Both modalities in one tensor: rows [0, B) image, [B, 2B) text.
            students = l2_normalize(torch.cat([image_feats, text_feats]).float())
            plans = self._plan_features(students, image_plan_feats, text_plan_feats)
            if warming_up:
                losses = {f'loss_{t}': codewords_t.sum() * 0.0 for t in terms}
            else:
                sim = students @ codewords_t                             # (2B, K)
                losses, values, logp, q = self._terms(sim, plans, codewords_t, B, ce_terms, ot_terms, inputs)
        if not warming_up:
            # One fused flag for every input: a NaN or inf anywhere reaches these sums.
            check(torch.isfinite(values).all(), lambda: self._nonfinite_error(inputs))
        if self.training:
            if self.plan_queues is not None:
                for queue, rows in zip(self.plan_queues.values(), plans.split(B)):
                    queue.enqueue(rows)
            if self.warmup_steps > 0:
                self.set_counter('num_steps', self.counter('num_steps') + 1)
            if self.track_usage and not warming_up:
                self._usage_stats(sim, logp, q)
        return losses

    def _check_inputs(self, image_feats, text_feats, image_plan_feats, text_plan_feats) -> Dict[str, torch.Tensor]:
        """Shapes of every input (values: one fused flag later); the named inputs."""
        d = self.codebook.embed_dim
        check_features('image_feats', image_feats, d, values=False)
        check_features('text_feats', text_feats, d, values=False)
        if image_feats.shape[0] != text_feats.shape[0]:
            raise ValueError('image_feats and text_feats must be paired (same batch size), got '
                             f'{tuple(image_feats.shape)} and {tuple(text_feats.shape)}')
        inputs = {'image_feats': image_feats, 'text_feats': text_feats}
        for name, plan_feats in (('image_plan_feats', image_plan_feats), ('text_plan_feats', text_plan_feats)):
            if plan_feats is None:
                continue
            check_features(name, plan_feats, d, values=False)
            if plan_feats.shape[0] != image_feats.shape[0]:
                raise ValueError(f'{name} must have one row per instance ({image_feats.shape[0]}), got '
                                 f'shape {tuple(plan_feats.shape)}')
            inputs[name] = plan_feats
        return inputs

    @staticmethod
    @torch.no_grad()
    def _plan_features(students, image_plan_feats, text_plan_feats) -> torch.Tensor:
        """(2B, d) unit-norm, detached features the plans come from, image rows first."""
        if image_plan_feats is None and text_plan_feats is None:
            return students.detach()
        B = students.shape[0] // 2
        image = students[:B] if image_plan_feats is None else image_plan_feats
        text = students[B:] if text_plan_feats is None else text_plan_feats
        return l2_normalize(torch.cat([image, text]).float())

    def _terms(self, sim, plans, codewords_t, B, ce_terms, ot_terms, inputs):
        """The weighted terms from the students' codeword similarities ``sim`` (2B, K)."""
        separate = len(inputs) > 2          # plan features given: the plans are not the students'
        # 'plan': the L_ot cost of the plans' own (detached) features, so only the codebook
        # gets its gradient; 'student': the students are pulled to codewords too.
        cost_sim = (sim if self.ot_cost_features == 'student' else plans @ codewords_t) if ot_terms else None
        with torch.no_grad():
            if not separate:
                plan_sim = sim
            elif cost_sim is not None and cost_sim is not sim:
                plan_sim = cost_sim
            else:
                plan_sim = plans @ codewords_t
            q = self._assignments_with_queue(plan_sim, codewords_t, B, inputs)
        scale = self._term_scale(B, sim.device)
        per_row, logp = [], None
        if ce_terms:
            # Swapped prediction: image rows score the text plan, text rows the image plan.
            logp = F.log_softmax(sim * (1.0 / self.temperature), dim=1)
            per_row.append((q.roll(B, dims=0) * logp).sum(1))     # -L_i2p, -L_t2p rows
        if ot_terms:
            per_row.append((q * (1.0 - cost_sim)).sum(1))          # L_ot_v, L_ot_t rows
        rows = per_row[0] if len(per_row) == 1 else torch.cat(per_row)
        values = rows.view(2 * len(per_row), B).sum(1) * scale[(0 if ce_terms else 2):(4 if ot_terms else 2)]
        names = (('i2p', 't2p') if ce_terms else ()) + (('ot_v', 'ot_t') if ot_terms else ())
        return {f'loss_{t}': v for t, v in zip(names, values.unbind()) if t in self.enabled_terms}, values, logp, q

    def _assignments_with_queue(self, plan_sim, codewords_t, B, inputs) -> torch.Tensor:
        """(2B, K) row-normalised plans of this batch, image rows first. With a plan queue each
        modality's solve also transports the queued rows (this rank's share of them, so the
        joint solve sees every queued row once); only the batch's rows are returned."""
        costs = list((1.0 - plan_sim).split(B))
        if self.plan_queues is None:
            queued_rows = False
        else:
            queued_rows = any(len(queue) for queue in self.plan_queues.values())
            for i, queue in enumerate(self.plan_queues.values()):
                if len(queue):
                    queued = queue.features()[dist.even_shard(len(queue))]
                    costs[i] = torch.cat([costs[i], 1.0 - queued @ codewords_t])
        try:
            plans = [self._assign(cost, name) for cost, name in zip(costs, ('image', 'text'))]
            return torch.cat([plan[:B] for plan in plans] if queued_rows else plans)
        except ValueError as err:
            if 'must be finite' not in str(err):
                raise
            raise self._nonfinite_error(inputs) from err   # names the input

    def _term_scale(self, batch: int, device) -> torch.Tensor:
        """Per-term factors (i2p, t2p, ot_v, ot_t) turning sums over this rank's rows into its
        weighted share: ``weight / B_rank * B_rank * world / B_joint`` (cross-entropies negated)."""
        key = (batch, device, tuple(self.term_weights.values()))
        if self._scale_cache is None or self._scale_cache[0] != key:
            weights = [-self.term_weights['i2p'], -self.term_weights['t2p'],
                       self.term_weights['ot_v'], self.term_weights['ot_t']]
            self._scale_cache = (key, torch.tensor([w / max(batch, 1) for w in weights], device=device))
        scale = self._scale_cache[1]
        weight = dist.batch_weight(batch, device)
        return scale if isinstance(weight, float) else scale * weight

    def _nonfinite_error(self, inputs: Mapping[str, torch.Tensor]) -> Exception:
        """The input that holds NaN or inf, else the codebook, else the loss itself."""
        if not bool(torch.isfinite(self.codebook.weight).all()):
            fallback = ValueError('the codebook weight contains NaN or inf values')
        else:
            fallback = ValueError('CodebookOTLoss: a loss term is NaN or inf although every input is finite')
        return nonfinite_error(inputs, fallback)

    @torch.no_grad()
    def _usage_stats(self, sim, logp, q) -> None:
        # The plans' codeword mass is uniform by construction (equipartition), so usage is
        # measured on what the students predict: softmax(z c / tau), both modalities.
        # Device scalars: read when logged, not here.
        if logp is None:
            logp = F.log_softmax(sim * (1.0 / self.temperature), dim=1)
        mass = self.codebook.update_usage(logp.exp(), normalized_rows=True)
        self.last_stats['code_perplexity'] = torch.special.entr(mass).sum().exp()
        # Codewords one instance's plan row is spread over: exp(mean row entropy), this rank.
        self.last_stats['code_plan_perplexity'] = (torch.special.entr(q).sum() / max(q.shape[0], 1)).exp()
