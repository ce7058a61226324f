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

**Which features the OT cost term sees** (:math:`\tilde Z`, ``ot_cost_features``; the paper does
not say). ``'plan'`` (default): the features the plan was computed from (the momentum teacher's
when given), detached, so :math:`L_{ot}` moves only the codebook towards the data. ``'student'``:
the student features, so :math:`L_{ot}` also pulls the students towards codewords. ``'off'``: no
:math:`L_{ot}` terms. On real data (``benchmarks/real_data_ablation.py``, 10 paired seeds)
the choice made no difference; on a held-out real set the student form hurt retrieval and
collapsed the contrastive temperature while the plan form helped, hence the default
(docs/ot_and_codebook.md).

The swapped prediction is SwAV's (Caron et al., NeurIPS 2020) across modalities. The plans
come from ``*_plan_feats`` when given (the paper's best: momentum-teacher features) and from
the student features otherwise -- the "teacher feature" / "student feature" ablation. The
gradient reaches the student features (through the swapped predictions, and through
:math:`L_{ot}` with ``ot_cost_features='student'``) and the codebook, never the plans. Everything is fp32
whatever the autocast dtype.

Under DDP each rank passes its own rows: the plans are those of the joint batch (the solver
all-reduces its column sums), and each term is a mean over this rank's rows, so DDP's
gradient averaging gives the joint-batch gradient.

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

from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from vlp_codebook.models.codebook import Codebook, check_features, entropy
from vlp_codebook.models.losses.functional import soft_cross_entropy
from vlp_codebook.ot import sinkhorn
from vlp_codebook.registry import MODELS

__all__ = ['CodebookOTLoss', 'OT_COST_FEATURES']

TERMS = ('i2p', 't2p', 'ot_v', 'ot_t')
OT_COST_FEATURES = ('plan', 'student', 'off')


@MODELS.register_module()
class CodebookOTLoss(nn.Module):
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
            given): ``None`` (default) = N(0, 1) entries, so a codeword turns about ``lr`` radians
            per Adam step; ``1.0`` = unit-norm codewords (:math:`\sqrt{d}` times faster). See
            :class:`~vlp_codebook.models.codebook.Codebook`.
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
                 codeword_init_norm: Optional[float] = None,
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
        self.last_stats: Dict[str, float] = {}

    @property
    def enabled_terms(self):
        return tuple(t for t in TERMS if self.term_weights[t] != 0)

    @torch.no_grad()
    def assignments(self, plan_feats: torch.Tensor, name: str = 'plan_feats') -> torch.Tensor:
        """Row-normalised OT plan (N, K) of ``plan_feats`` to the codebook: each row sums to 1."""
        check_features(name, plan_feats, self.codebook.embed_dim)
        plan, info = sinkhorn(self.codebook.cost(plan_feats.detach()), self.epsilon,
                              max_iters=self.sinkhorn_max_iters, tol=self.sinkhorn_tol,
                              return_info=True)
        self.last_stats[f'sinkhorn_iters_{name}'] = float(info.iterations)
        self.last_stats[f'sinkhorn_err_{name}'] = info.marginal_error
        return plan / plan.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

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
            scalars, already weighted.
        """
        d = self.codebook.embed_dim
        check_features('image_feats', image_feats, d)
        check_features('text_feats', text_feats, d)
        if image_feats.shape[0] != text_feats.shape[0]:
            raise ValueError('image_feats and text_feats must be paired (same batch size), got '
                             f'{tuple(image_feats.shape)} and {tuple(text_feats.shape)}')
        for name, plan_feats, feats in (('image_plan_feats', image_plan_feats, image_feats),
                                        ('text_plan_feats', text_plan_feats, text_feats)):
            if plan_feats is None:
                continue
            check_features(name, plan_feats, d)
            if plan_feats.shape[0] != feats.shape[0]:
                raise ValueError(f'{name} must have one row per instance ({feats.shape[0]}), got '
                                 f'shape {tuple(plan_feats.shape)}')
        terms = self.enabled_terms
        with torch.autocast(device_type=image_feats.device.type, enabled=False):
            codewords = self.codebook()                                  # (K, d) fp32
            zv = F.normalize(image_feats.float(), dim=1)
            zt = F.normalize(text_feats.float(), dim=1)
            plan_v = zv if image_plan_feats is None else F.normalize(image_plan_feats.float(), dim=1)
            plan_t = zt if text_plan_feats is None else F.normalize(text_plan_feats.float(), dim=1)
            plan_v, plan_t = plan_v.detach(), plan_t.detach()
            q_v = self.assignments(plan_v, 'image')
            q_t = self.assignments(plan_t, 'text')
            sim_v = zv @ codewords.T                                     # (B, K)
            sim_t = zt @ codewords.T
            # 'plan': the cost of the plans' own (detached) features, so only the codebook
            # gets the gradient of L_ot; 'student': the students are pulled to codewords too.
            student_cost = self.ot_cost_features == 'student'
            losses: Dict[str, torch.Tensor] = {}
            if 'i2p' in terms:
                losses['loss_i2p'] = soft_cross_entropy(sim_v / self.temperature, q_t)
            if 't2p' in terms:
                losses['loss_t2p'] = soft_cross_entropy(sim_t / self.temperature, q_v)
            # Transport cost per unit of this rank's mass: <T, M> on one process, and the
            # DDP average over ranks of equal batch size otherwise.
            if 'ot_v' in terms:
                cost_sim_v = sim_v if student_cost else plan_v @ codewords.T
                losses['loss_ot_v'] = (q_v * (1.0 - cost_sim_v)).sum(1).mean()
            if 'ot_t' in terms:
                cost_sim_t = sim_t if student_cost else plan_t @ codewords.T
                losses['loss_ot_t'] = (q_t * (1.0 - cost_sim_t)).sum(1).mean()
            losses = {k: v * self.term_weights[k[len('loss_'):]] for k, v in losses.items()}
        if self.training and self.track_usage:
            self._usage_stats(sim_v, sim_t, q_v, q_t)
        return losses

    @torch.no_grad()
    def _usage_stats(self, sim_v, sim_t, q_v, q_t) -> None:
        # The plans' codeword mass is uniform by construction (equipartition), so usage is
        # measured on what the students predict: softmax(z c / tau), both modalities.
        predicted = torch.cat([sim_v, sim_t]).div(self.temperature).softmax(dim=1)
        mass = self.codebook.update_usage(predicted)
        self.last_stats['code_perplexity'] = Codebook.mass_perplexity(mass).item()
        # Codewords one instance's plan row is spread over: exp(mean row entropy), this rank.
        self.last_stats['code_plan_perplexity'] = entropy(torch.cat([q_v, q_t])).mean().exp().item()
