r"""Entropic optimal transport between a set of instances and a set of codewords.

Given a cost matrix :math:`M \in \mathbb{R}^{B \times K}` and the uniform marginals
:math:`a = \mathbf{1}/B`, :math:`b = \mathbf{1}/K`, :func:`sinkhorn` returns the plan

.. math::
    T^\star = \arg\min_{T \ge 0,\; T\mathbf{1}=a,\; T^\top\mathbf{1}=b}
              \langle T, M\rangle - \varepsilon H(T),
    \qquad H(T) = -\sum_{ik} T_{ik}(\log T_{ik} - 1),

whose form is :math:`T^\star = \operatorname{diag}(u)\, e^{-M/\varepsilon}\, \operatorname{diag}(v)`
(Cuturi, "Sinkhorn Distances", NeurIPS 2013). It is what POT's ``ot.sinkhorn(a, b, M, reg=ε)``
computes with uniform ``a, b``; CODIS (Duan et al., CVPR 2022) and SwAV (Caron et al., NeurIPS
2020) use it to assign instances to codewords with equal codeword usage.

The solve runs to an L1 marginal error below ``tol`` (not SwAV's fixed 3 iterations), in
fp32 with autocast off, with one host read per ``check_every`` iterations; scalings that leave
[1e-15, 1e15] are folded into log-domain potentials (Schmitzer, SISC 2019); after
``_PLAIN_ITERS`` plain iterations the column update is Anderson-mixed (Walker & Ni, SINUM 2011),
since plain iterations stall when the batch is as large as the codebook and features cluster.
Under ``torch.distributed`` each rank passes its rows and the column sums are all-reduced, so
every rank gets its rows of the joint batch's plan (SwAV's ``distributed_sinkhorn``, converged).
The why and the measurements of each choice: docs/ot_and_codebook.md.

Example::

    >>> import torch
    >>> from vlp_codebook.ot import sinkhorn, transport_cost
    >>> z = torch.nn.functional.normalize(torch.randn(256, 64), dim=1)
    >>> c = torch.nn.functional.normalize(torch.randn(128, 64), dim=1)
    >>> cost = 1 - z @ c.T                     # (B, K) cosine cost
    >>> plan, info = sinkhorn(cost, epsilon=0.05, return_info=True)
    >>> plan.shape, info.converged
    (torch.Size([256, 128]), True)
    >>> assignments = plan * plan.shape[0]     # each row a distribution over codewords
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from vlp_codebook import dist
from vlp_codebook.anderson import AndersonMixer

__all__ = ['sinkhorn', 'SinkhornInfo', 'transport_cost', 'default_check_every', 'plain_iteration']

# At a check, scalings outside [1/e^_LOG_ABSORB, e^_LOG_ABSORB] are folded into the potentials.
# 1e15 leaves a factor 1e23 of headroom to fp32's 3e38 for the iterations of the next block.
_LOG_ABSORB = math.log(1e15)
# Refused above this (max(cost) - min(cost)) / epsilon: fp32 rounds the exponent of the kernel
# by ~2^-24 times it (0.6 % of the entries at 1e5), and Sinkhorn needs about as many iterations.
MAX_COST_RANGE_OVER_EPSILON = 1e5
# Plain iterations before Anderson mixing (~30 small kernels a step, a plain one 4): in the loss's
# range plain solves take 1-20 iterations or stall for hundreds (docs/ot_and_codebook.md).
_PLAIN_ITERS = 25
CHECK_EVERY = {'cpu': 1}
CHECK_EVERY_ACCELERATOR = 4


def default_check_every(device: torch.device) -> int:
    """Iterations between convergence checks when ``check_every`` is not given: 1 on the CPU,
    where a host read costs nothing, 4 on accelerators, where each read waits for the queue to
    drain (at most 3 spare iterations against one stall per iteration)."""
    return CHECK_EVERY.get(torch.device(device).type, CHECK_EVERY_ACCELERATOR)


@dataclass
class SinkhornInfo:
    """Diagnostics of one :func:`sinkhorn` call: errors ``||T 1 - a||_1`` (joint batch) and
    ``||T^T 1 - b||_1``, their max, ``converged = marginal_error <= tol``, and counts of
    iterations, of foldings into the log-domain potentials and of host reads."""
    iterations: int
    marginal_error: float
    row_error: float
    col_error: float
    converged: bool
    absorptions: int
    host_reads: int = 0


@torch.no_grad()
def sinkhorn(cost: torch.Tensor,
             epsilon: float,
             *,
             max_iters: int = 1000,
             tol: float = 1e-4,
             anderson: int = 3,
             check_every: Optional[int] = None,
             process_group: Optional[object] = None,
             return_info: bool = False,
             warn_not_converged: bool = True,
             row_normalized: bool = False,
             ) -> Union[torch.Tensor, Tuple[torch.Tensor, SinkhornInfo]]:
    r"""Entropic OT plan between instances (rows) and codewords (columns), uniform marginals.

    ``cost``: (B, K), any floating dtype; under ``torch.distributed`` this rank's rows (B may
    differ across ranks, K may not; ``process_group`` defaults to the world). ``epsilon`` > 0 in the
    units of ``cost``. A plan that has not met ``tol`` in ``max_iters`` iterations is returned with
    a ``RuntimeWarning`` (unless ``warn_not_converged=False``). ``anderson``: past iterates mixed
    after ``_PLAIN_ITERS`` plain ones (0: plain Sinkhorn-Knopp). ``check_every`` (default
    :func:`default_check_every`): iterations per host read, up to ``check_every - 1`` run past
    the one that met ``tol``.

    Returns the (B, K) fp32 plan ``T``, rows summing to ``1 / B_joint`` and columns (joint batch)
    to ``1 / K`` -- with ``row_normalized``, ``B_joint · T`` computed as ``K_ij v_j / (K v)_i`` --
    and a :class:`SinkhornInfo` when ``return_info``. ``ValueError`` for a ``cost`` not 2-D, empty,
    not finite (read at the first check) or spanning more than ``MAX_COST_RANGE_OVER_EPSILON`` ε,
    and for arguments out of range.
    """
    check_every = default_check_every(getattr(cost, 'device', 'cpu')) if check_every is None else check_every
    _check_arguments(cost, epsilon, anderson, max_iters, tol, check_every)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        M = cost if cost.dtype == torch.float32 else cost.float()  # no_grad: nothing is recorded
        if not dist.is_distributed(process_group) and M.shape[0] == 0:
            raise ValueError('cost has no rows (instances)')
        solver = _Solver(M, float(epsilon), anderson, process_group)
        plan, info = solver.run(max_iters, check_every, tol, row_normalized)
    if warn_not_converged and not info.converged:
        warnings.warn(f'sinkhorn: marginal error {info.marginal_error:.3g} > tol={tol:g} after '
                      f'{info.iterations} iterations (epsilon={epsilon:g}); raise max_iters or '
                      'epsilon', RuntimeWarning, stacklevel=2)
    return (plan, info) if return_info else plan


def _check_arguments(cost, epsilon, anderson, max_iters, tol, check_every) -> None:
    if not isinstance(cost, torch.Tensor) or cost.dim() != 2:
        raise ValueError('cost must be a 2-D tensor (instances x codewords), got '
                         f'{type(cost).__name__} with shape {tuple(getattr(cost, "shape", ()))}')
    if cost.shape[1] == 0:
        raise ValueError(f'cost must have at least one column (codeword), got shape {tuple(cost.shape)}')
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f'epsilon must be a positive finite number, got {epsilon!r}')
    _check_count('anderson', anderson, minimum=0)
    _check_count('max_iters', max_iters, minimum=1)
    _check_count('check_every', check_every, minimum=1)
    if not tol > 0:
        raise ValueError(f'tol must be > 0, got {tol!r}')


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}')


def plain_iteration(kernel: torch.Tensor, kernel_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    col: torch.Tensor, group=None):
    """One plain Sinkhorn-Knopp iteration, a pure function of tensors (two divisions, two
    matrix-vector products; one all-reduce when sharded).

    Given the kernel ``K`` (B, K), its transpose view, the marginals and the current joint
    column sums ``col = Kᵀu``: ``v = b / col``, ``u = a / (K v)``. Returns ``(u, v, K v, Kᵀu)``.
    A block of these compiles to one graph (``torch.compile(fullgraph=True)``).
    """
    v = b / col
    u, Kv, col = _row_update(kernel, kernel_t, a, v, group)
    return u, v, Kv, col


def _row_update(kernel, kernel_t, a, v, group):
    Kv = torch.mv(kernel, v)
    u = a / Kv
    return u, Kv, dist.all_reduce_sum(torch.mv(kernel_t, u), group)


class _Solver:
    """State of one solve: kernel ``K = exp((f_i + g_j - M_ij)/ε)`` and scalings ``u, v``; the
    plan is ``diag(u) K diag(v)``. ``f is None`` while the kernel is still the initial row
    softmax (its row potentials are implicit)."""

    def __init__(self, M: torch.Tensor, eps: float, anderson: int, group):
        self.M, self.eps, self.group = M, eps, group
        B, K = M.shape
        self.first_read = self._cost_checks()
        self.joint_rows = float(B)    # the host's copy; set at the first read when sharded
        self.a = M.new_full((B,), 1.0 / max(B, 1))
        if dist.is_distributed(group):
            rows = dist.all_reduce_sum(M.new_tensor(float(B)), group)
            self.first_read['joint_rows'] = rows
            self.a = M.new_ones(B) / rows
        self.b = M.new_full((K,), 1.0 / K)
        # The initial kernel is the row softmax of -M/eps (g = 0, f_i = -eps logsumexp_j(-M_ij/eps)):
        # rows sum to 1, so u = a is already the first row update. In place in one buffer: a second
        # fresh B x K tensor would cost its page faults (measured: twice the time of this pass).
        self.kernel = torch.mul(M, -1.0 / eps)
        torch._softmax(self.kernel, 1, False, out=self.kernel)
        self.kernel_t = self.kernel.t()    # a view: in-place rebuilds of the kernel show through
        self.f: Optional[torch.Tensor] = None
        self.g = M.new_zeros(K)
        self.mixer = AndersonMixer(anderson)
        self.log_v: Optional[torch.Tensor] = None   # float64 while Anderson mixes
        self.u, self.v, self.Kv = self.a, None, None
        self.col = dist.all_reduce_sum(torch.mv(self.kernel_t, self.a), group)

    def _cost_checks(self) -> Dict[str, torch.Tensor]:
        """The cost's range (NaN or inf if an entry is), joint over ranks; read with the first check."""
        M = self.M
        lo, hi = torch.aminmax(M) if M.numel() else (M.new_zeros(()), M.new_zeros(()))
        if not dist.is_distributed(self.group):
            return {'cost_range': hi - lo}
        finite = torch.isfinite(hi - lo)
        stats = dist.all_reduce_max(torch.stack([torch.where(finite, -lo, 0.0), torch.where(finite, hi, 0.0),
                                                 (~finite).float()]), self.group)
        return {'cost_range': torch.where(stats[2] > 0, math.inf, stats[0] + stats[1])}

    def _raise_on_bad_cost(self, read: Dict[str, float]) -> None:
        if not math.isfinite(read['cost_range']):
            bad = int((~torch.isfinite(self.M)).sum())
            where = f'{bad} of its {self.M.numel()} entries are' if bad else 'another rank holds'
            raise ValueError(f'cost must be finite, but {where} NaN or inf (shape {tuple(self.M.shape)})')
        ratio = read['cost_range'] / self.eps
        if ratio > MAX_COST_RANGE_OVER_EPSILON:
            raise ValueError(
                f'cost spans {read["cost_range"]:.3g} (max - min), {ratio:.3g} times epsilon='
                f'{self.eps:g}: above {MAX_COST_RANGE_OVER_EPSILON:g}, fp32 rounds the kernel '
                f'exp(-cost/epsilon) by a factor up to e^{ratio * 2 ** -24:.2g} per entry and the '
                'plan would be wrong; rescale the cost (cosine costs of unit-norm features lie in '
                '[0, 2]) or raise epsilon')
        if read.get('joint_rows', 1.0) == 0:
            raise ValueError('cost has no rows (instances) on any rank')

    # ------------------------------------------------------------ iterations
    def _iterate(self) -> None:
        """One column update (plain, or Anderson-mixed once :attr:`log_v` is set) and one
        exact row update: a fixed sequence of kernels, no host read."""
        if self.log_v is None:
            self.u, self.v, self.Kv, self.col = plain_iteration(
                self.kernel, self.kernel_t, self.a, self.b, self.col, self.group)
            return
        err = torch.dist(self.v * self.col, self.b, 1)
        # The plain update of log v, centred: the plan is blind to a constant added to log v,
        # and mixing images that differ by such constants could drift it until v overflows.
        image = self.log_b64 - torch.log(self.col.double())
        self.log_v = self.mixer.step(self.log_v, image - image.mean(), err)
        self.v = torch.exp(self.log_v).float()
        self.u, self.Kv, self.col = _row_update(self.kernel, self.kernel_t, self.a, self.v, self.group)

    def _start_anderson(self) -> None:
        """Mix from here on; ``log v`` in float64 (fp32 would round ``v`` to ``|log v| · 6e-8``
        relative, an error floor of ~1e-6 once ``|log v|`` reaches ~20)."""
        self.log_v = torch.log(self.v).double()
        self.log_b64 = torch.log(self.b).double()
        self.mixer.reset()

    def _state(self, first: bool) -> Dict[str, torch.Tensor]:
        """The errors and the widest ``|log|`` of the scalings as device scalars (the same on
        every rank), and on the first check the cost checks."""
        state = {'col_err': torch.dist(self.v * self.col, self.b, 1),
                 'row_err': dist.all_reduce_sum(torch.dist(self.u * self.Kv, self.a, 1), self.group)}
        # While the kernel is the initial row softmax (rows summing to 1), K v lies between min v
        # and max v, so u = a / K v is bounded by a / max v and a / min v: no pass over u.
        lo, hi = torch.aminmax(self.v if self.f is None else torch.cat([self.u, self.v]))
        if dist.is_distributed(self.group):
            lo, hi = -dist.all_reduce_max(-lo, self.group), dist.all_reduce_max(hi, self.group)
        state.update(scaling_min=lo, scaling_max=hi)
        return {**state, **self.first_read} if first else state

    def _read(self, first: bool) -> Dict[str, float]:
        """:meth:`_state` with one host read; the first one raises on a bad cost."""
        state = self._state(first)
        read = dict(zip(state, torch.stack(list(state.values())).tolist()))
        if first:
            self._raise_on_bad_cost(read)
            self.joint_rows = max(read.get('joint_rows', self.joint_rows), 1.0)
        lo, hi = read['scaling_min'], read['scaling_max']
        if not (lo > 0 and hi < math.inf):
            read['log_range'] = math.nan
            return read
        bounds = [lo, hi] + ([1 / (self.joint_rows * hi), 1 / (self.joint_rows * lo)] if self.f is None else [])
        read['log_range'] = max(abs(math.log(x)) for x in bounds)
        return read

    def run(self, max_iters: int, check_every: int, tol: float, row_normalized: bool
            ) -> Tuple[torch.Tensor, SinkhornInfo]:
        iters = absorptions = reads = 0
        while True:
            for _ in range(min(check_every, max_iters - iters)):
                if iters == _PLAIN_ITERS and self.mixer.depth:
                    self._start_anderson()
                self._iterate()
                iters += 1
            read = self._read(first=reads == 0)
            reads += 1
            if not all(math.isfinite(read[k]) for k in ('col_err', 'row_err', 'log_range')):
                # A scaling over- or underflowed in this block: exact log-domain update instead.
                self._log_domain_update()
                absorptions += 1
                if iters < max_iters:
                    continue
                read = self._read(first=False)
                reads += 1
            if max(read['col_err'], read['row_err']) <= tol or iters >= max_iters:
                break
            if read['log_range'] > _LOG_ABSORB:
                self._absorb()
                absorptions += 1
        if row_normalized:
            # T_ij / a_i = K_ij v_j / (K v)_i: the last row update set u = a / K v.
            plan = self.kernel.mul_(self.v).div_(self.Kv.unsqueeze(1))
        else:
            plan = self.kernel.mul_(self.u.unsqueeze(1)).mul_(self.v)
        err = max(read['row_err'], read['col_err'])
        return plan, SinkhornInfo(iterations=iters, marginal_error=err, row_error=read['row_err'],
                                  col_error=read['col_err'], converged=err <= tol,
                                  absorptions=absorptions, host_reads=reads)

    # ------------------------------------------------------------ absorption
    def _rebuild_kernel(self) -> None:
        """Kernel from the potentials, scalings back to 1, and the products that go with them."""
        torch.sub(self.f[:, None], self.M, out=self.kernel).add_(self.g[None, :]).div_(self.eps).exp_()
        self.u, self.v = torch.ones_like(self.a), torch.ones_like(self.b)
        self.Kv = torch.mv(self.kernel, self.v)
        self.col = dist.all_reduce_sum(torch.mv(self.kernel_t, self.u), self.group)
        if self.log_v is not None:
            self._start_anderson()   # old iterates mean nothing for the new kernel

    def _absorb(self) -> None:
        """Fold the scalings into the potentials: ``f += ε log u``, ``g += ε log v``."""
        eps = self.eps
        if self.f is None:
            # Row potentials of the initial softmax, read off each row's largest entry
            # (>= 1/K, so its logarithm is exact): f_i = eps log K_ij + M_ij.
            k_max, j_max = self.kernel.max(dim=1)
            self.f = eps * torch.log(k_max) + self.M.gather(1, j_max[:, None]).squeeze(1)
        self.f = self.f + eps * torch.log(self.u)
        self.g = self.g + eps * torch.log(self.v)
        self._rebuild_kernel()

    def _log_domain_update(self) -> None:
        """Exact potentials from the cost alone (immune to under/overflow of ``u, v, K``): a
        row, a column and a row update in the log domain, after which rows sum to ``a``."""
        M, eps, log_a = self.M, self.eps, torch.log(self.a)
        g = self.g if self.f is None else torch.where(torch.isfinite(self.g), self.g, 0.0)
        f = eps * (log_a - torch.logsumexp((g[None, :] - M) / eps, dim=1))
        f = torch.where(torch.isfinite(f), f, 0.0)
        self.g = eps * (torch.log(self.b) - _logsumexp_joint((f[:, None] - M) / eps, self.group))
        self.f = eps * (log_a - torch.logsumexp((self.g[None, :] - M) / eps, dim=1))
        self._rebuild_kernel()


def _logsumexp_joint(x: torch.Tensor, group) -> torch.Tensor:
    """log-sum-exp over dim 0 of a row-sharded matrix: max-subtracted, sums all-reduced."""
    local_max = x.max(dim=0).values if x.shape[0] else x.new_full((x.shape[1],), -math.inf)
    joint_max = dist.all_reduce_max(local_max, group)
    joint_max = torch.where(torch.isfinite(joint_max), joint_max, torch.zeros_like(joint_max))
    s = dist.all_reduce_sum(torch.exp(x - joint_max).sum(dim=0), group)
    return torch.log(s) + joint_max


def transport_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    r"""The transport cost :math:`\langle T, M\rangle = \sum_{ik} T_{ik} M_{ik}`, in fp32.

    Differentiable in ``cost`` (the plan is treated as a constant by callers that pass a
    detached plan). Under row sharding this is this rank's share; sum over ranks for the total.
    """
    if plan.shape != cost.shape:
        raise ValueError(f'plan and cost must have the same shape, got {tuple(plan.shape)} and '
                         f'{tuple(cost.shape)}')
    return (plan.float() * cost.float()).sum()
