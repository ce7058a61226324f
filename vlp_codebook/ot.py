r"""Entropic optimal transport between a set of instances and a set of codewords.

Given a cost matrix :math:`M \in \mathbb{R}^{B \times K}` and marginals :math:`a \in
\Delta_B`, :math:`b \in \Delta_K` (default uniform), :func:`sinkhorn` returns the plan

.. math::
    T^\star = \arg\min_{T \ge 0,\; T\mathbf{1}=a,\; T^\top\mathbf{1}=b}
              \langle T, M\rangle - \varepsilon H(T),
    \qquad H(T) = -\sum_{ik} T_{ik}(\log T_{ik} - 1),

whose form is :math:`T^\star = \operatorname{diag}(u)\, e^{-M/\varepsilon}\, \operatorname{diag}(v)`
(Cuturi, "Sinkhorn Distances", NeurIPS 2013). It is what POT's ``ot.sinkhorn(a, b, M, reg=ε)``
computes; CODIS (Duan et al., CVPR 2022) and SwAV (Caron et al., NeurIPS 2020) use it to assign
instances to codewords with equal codeword usage.

How it is computed, and why:

* **Converged, not truncated.** Iterations run until the L1 marginal error
  :math:`\max(\|T\mathbf{1}-a\|_1, \|T^\top\mathbf{1}-b\|_1)` is below ``tol`` (default 1e-4);
  SwAV's fixed 3 iterations leave errors of order 1e-1 (see ``docs/ot_and_codebook.md``).
  Every iteration ends on an exact row update, so rows are met to float precision (a plan
  stopped by ``max_iters`` still carries exactly the mass of ``a``) and the error that decides
  is the column error.
* **No host waits inside the loop.** Iterations run in blocks of ``check_every``; a block is a
  fixed sequence of kernels with no data-dependent Python branch (Anderson's safeguard below is
  ``torch.where``), so on a GPU it queues without stalling and CUDA graphs / ``torch.compile``
  can take it. After each block *one* host read fetches the marginal errors, the range of the
  scalings and (after the first block) the input checks: a solve of ``n`` iterations reads the
  device ``ceil(n / check_every)`` times (``SinkhornInfo.host_reads``). The default is 1 on the
  CPU, where a read costs nothing, and 4 on accelerators (``docs/ot_and_codebook.md``).
* **Stable for ε from 1e-3 to 1.** Scaling iterations in fp32 with *absorption*: at a check,
  scalings ``u, v`` that left [1e-15, 1e15] are folded into log-domain potentials ``f, g``
  (Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport
  problems", SISC 2019) and the kernel ``exp((f_i + g_j - M_ij)/ε)`` is rebuilt; a block in
  which a scaling over- or underflowed is replaced by an exact log-domain update. Costs whose
  range is more than 1e5 ε are refused (fp32 cannot resolve their kernel).
* **Fast.** The kernel starts as the row softmax of ``-M/ε`` (one max-subtracted pass that also
  does the first row update); each iteration is two fp32 matrix-vector products
  (:func:`plain_iteration`: four kernels) and a check is six. The column update
  ``log v ← log b - log Kᵀu`` is a fixed-point map, accelerated by safeguarded Anderson
  mixing of the last 3 iterates (Walker & Ni, SINUM 2011) -- 17 instead of 30 iterations on
  clustered 1024 x 4096 costs at ε = 0.01, and convergence on near-permutation problems
  where plain Sinkhorn stalls -- but only when the rate of the plain iterations predicts a
  long solve (more than ``_PLAIN_ENOUGH`` iterations left; ``_PLAIN_ENOUGH_LARGE`` on
  problems of ``_LARGE_PROBLEM`` entries or more): an Anderson step is ~30 small kernels,
  more than the 2-6 plain iterations of a codebook loss's solve cost in all.
* **fp32, no gradient, any device.** Inputs of any floating dtype (bf16 and fp16 included)
  are upcast; autocast is disabled inside.
* **Sharded instances.** With ``torch.distributed`` initialised each rank passes its own rows
  of the cost; the column sums are all-reduced through :mod:`vlp_codebook.dist`, so every rank
  gets its rows of the plan of the joint batch (the idea of SwAV's ``distributed_sinkhorn``,
  run to convergence). All ranks take every decision on the same all-reduced numbers.

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

__all__ = ['sinkhorn', 'SinkhornInfo', 'transport_cost', 'check_finite', 'default_check_every', 'plain_iteration']

# At a check, scalings outside [1/e^_LOG_ABSORB, e^_LOG_ABSORB] are folded into the potentials.
# 1e15 leaves a factor 1e23 of headroom to fp32's 3e38 for the iterations of the next block.
_LOG_ABSORB = math.log(1e15)
_LOG_ABSORB_LAST = math.log(1e30)
# Refused above this (max(cost) - min(cost)) / epsilon: fp32 rounds the exponent of the kernel
# by ~2^-24 times it (0.6 % of the entries at 1e5), and Sinkhorn needs about as many iterations.
MAX_COST_RANGE_OVER_EPSILON = 1e5
# Tikhonov weight of Anderson's Gram system, relative to its trace: Sinkhorn residuals become
# exactly linearly dependent near convergence.
_ANDERSON_RIDGE = 1e-10
# Iterations per host read by device type (see default_check_every).
CHECK_EVERY = {'cpu': 1}
CHECK_EVERY_ACCELERATOR = 4
# Plain Sinkhorn-Knopp until the rate of a block predicts more than this many iterations left;
# then Anderson mixing. An Anderson step is ~30 small kernels, worth it on a short solve only
# when an iteration's two B x K matrix-vector products dwarf them (_LARGE_PROBLEM entries).
_PLAIN_ENOUGH = 25
_PLAIN_ENOUGH_LARGE = 2
_LARGE_PROBLEM = 2 ** 20


def default_check_every(device: torch.device) -> int:
    """Iterations between convergence checks when ``check_every`` is not given.

    On the CPU a host read costs nothing (the numbers are already in host memory), so every
    iteration is checked and none is wasted. On an accelerator each read waits for the queue to
    drain; 4 costs at most 3 spare iterations (a few microseconds of bandwidth each at
    1024 x 4096) against one stall per iteration. ``benchmarks/gpu_check.sh`` measures the
    sweep on a GPU.
    """
    return CHECK_EVERY.get(torch.device(device).type, CHECK_EVERY_ACCELERATOR)


@dataclass
class SinkhornInfo:
    """Diagnostics of one :func:`sinkhorn` call.

    Attributes:
        iterations: Sinkhorn iterations run (one column and one row update each).
        marginal_error: ``max(row_error, col_error)``.
        row_error: ``||T 1 - a||_1`` over the joint batch.
        col_error: ``||T^T 1 - b||_1``.
        converged: ``marginal_error <= tol``.
        absorptions: how often the scalings were folded into the log-domain potentials
            (including exact log-domain restarts after an over- or underflow).
        host_reads: how often the solver read numbers back from the device.
    """
    iterations: int
    marginal_error: float
    row_error: float
    col_error: float
    converged: bool
    absorptions: int
    host_reads: int = 0


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor`` holds NaN or inf (one host read)."""
    bad = int((~torch.isfinite(tensor)).sum().item())
    if bad:
        raise ValueError(f'{name} must be finite, but {bad} of its {tensor.numel()} entries '
                         f'are NaN or inf (shape {tuple(tensor.shape)})')


@torch.no_grad()
def sinkhorn(cost: torch.Tensor,
             epsilon: float,
             a: Optional[torch.Tensor] = None,
             b: Optional[torch.Tensor] = None,
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
    r"""Entropic OT plan between instances (rows) and codewords (columns).

    Args:
        cost: (B, K) cost matrix, any floating dtype; under ``torch.distributed`` the rows of
            this rank (B may differ across ranks, K may not).
        epsilon: entropic regularisation ε > 0, in the units of ``cost``.
        a: (B,) row marginal of this rank's rows. Default: uniform ``1 / B_joint``. Across
            ranks the row marginals must sum to the same total as ``b``.
        b: (K,) column marginal. Default: uniform ``1 / K``.
        max_iters: upper bound on iterations; a plan that has not met ``tol`` by then is
            returned with a ``RuntimeWarning`` (and ``info.converged = False``).
        tol: target L1 marginal error.
        anderson: how many past iterates Anderson acceleration mixes (0: plain Sinkhorn-Knopp).
        check_every: iterations between convergence checks, each one host read (default:
            :func:`default_check_every` of the cost's device). The solve stops at the first
            check that meets ``tol``, so it may run up to ``check_every - 1`` spare iterations.
        process_group: the group the rows are sharded over (default: the world, if any).
        return_info: also return a :class:`SinkhornInfo`.
        warn_not_converged: warn when ``max_iters`` is reached before ``tol``.
        row_normalized: return the plan with every row divided by its sum, ``T_ij / a_i``
            (each row an assignment distribution over the columns), computed as
            ``K_ij v_j / (K v)_i`` without forming ``diag(u)``: the form the codebook loss uses.

    Returns:
        plan: (B, K) fp32 tensor ``T`` with rows summing to ``a`` and columns (over the joint
        batch) to ``b``; ``(plan, info)`` when ``return_info``.

    Raises:
        ValueError: ``cost`` not 2-D, empty, not finite, or spanning more than
            ``MAX_COST_RANGE_OVER_EPSILON`` times ε; ε not positive and finite; marginals of
            the wrong shape, not finite, negative or with different totals. Checks on values
            are made at the first host read, after the first block of iterations.
    """
    if not isinstance(cost, torch.Tensor) or cost.dim() != 2:
        raise ValueError('cost must be a 2-D tensor (instances x codewords), got '
                         f'{type(cost).__name__} with shape {tuple(getattr(cost, "shape", ()))}')
    if cost.shape[1] == 0:
        raise ValueError(f'cost must have at least one column (codeword), got shape {tuple(cost.shape)}')
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f'epsilon must be a positive finite number, got {epsilon!r}')
    _check_count('anderson', anderson, minimum=0)
    _check_count('max_iters', max_iters, minimum=1)
    if check_every is None:
        check_every = default_check_every(cost.device)
    _check_count('check_every', check_every, minimum=1)
    if not tol > 0:
        raise ValueError(f'tol must be > 0, got {tol!r}')

    with torch.autocast(device_type=cost.device.type, enabled=False):
        M = cost if cost.dtype == torch.float32 else cost.float()  # no_grad: nothing is recorded
        B, K = M.shape
        if not dist.is_distributed(process_group) and B == 0:
            raise ValueError('cost has no rows (instances)')
        solver = _Solver(M, float(epsilon), a, b, tol, anderson, process_group)
        plan, info = solver.run(max_iters, check_every, row_normalized)

    if warn_not_converged and not info.converged:
        warnings.warn(f'sinkhorn: marginal error {info.marginal_error:.3g} > tol={tol:g} after '
                      f'{info.iterations} iterations (epsilon={epsilon:g}); raise max_iters or '
                      'epsilon', RuntimeWarning, stacklevel=2)
    return (plan, info) if return_info else plan


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}')


def _read(values: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Device scalars -> floats, with one host read (no casts when they share a dtype)."""
    names = list(values)
    tensors = [values[n] for n in names]
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        tensors = [t if t.dtype == torch.float64 else t.double() for t in tensors]
    tensors = [t if t.dim() == 0 else t.reshape(()) for t in tensors]
    return dict(zip(names, torch.stack(tensors).tolist()))


def _row_update(kernel, kernel_t, a, v, masked_rows: bool = False, group=None):
    Kv = torch.mv(kernel, v)
    u = torch.where(a > 0, a / Kv, 0.0) if masked_rows else a / Kv
    return u, Kv, dist.all_reduce_sum(torch.mv(kernel_t, u), group)


def plain_iteration(kernel: torch.Tensor, kernel_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    col: torch.Tensor, masked_rows: bool = False, group=None):
    """One plain Sinkhorn-Knopp iteration of the solver, a pure function of tensors (4 kernels:
    two divisions, two matrix-vector products; one all-reduce when sharded).

    Given the kernel ``K`` (B, K), its transpose view, the marginals and the current joint
    column sums ``col = Kᵀu``: ``v = b / col``, ``u = a / (K v)``. Returns ``(u, v, K v, Kᵀu)``.
    ``masked_rows``: rows with ``a_i = 0`` get ``u_i = 0``. A block of these compiles to one
    graph (``torch.compile(fullgraph=True)``) and can be captured in a CUDA graph.
    """
    v = b / col
    u, Kv, col = _row_update(kernel, kernel_t, a, v, masked_rows, group)
    return u, v, Kv, col


class _Solver:
    """State of one solve: kernel ``K = exp((f_i + g_j - M_ij)/ε)`` and scalings ``u, v``; the
    plan is ``diag(u) K diag(v)``. ``f is None`` while the kernel is still the initial row
    softmax (its row potentials are implicit).

    Two modes of iteration: *plain* Sinkhorn-Knopp (four kernels an iteration) and Anderson-mixed
    (:class:`_AndersonMixer`, about 30 small kernels more). Every solve starts plain; at each
    check the rate of the last block predicts how many plain iterations are left, and Anderson
    is switched on only when that is more than ``_PLAIN_ENOUGH`` (``_PLAIN_ENOUGH_LARGE`` on
    problems large enough for an iteration's two matrix-vector products to dwarf Anderson's
    small kernels). Short solves (the codebook loss's: 2-5 iterations) stay plain."""

    def __init__(self, M, eps, a, b, tol, anderson, group):
        self.M, self.eps, self.tol, self.group = M, eps, tol, group
        B, K = M.shape
        device = M.device
        self.sharded = dist.is_distributed(group)
        # Value checks, read with the first check (no host read of their own).
        self.input_checks: Dict[str, torch.Tensor] = {}
        self._check_cost()
        if self.sharded:
            rows = dist.all_reduce_sum(torch.tensor(float(B), dtype=torch.float32, device=device), group)
            self.input_checks['joint_rows'] = rows
            joint_rows = rows.clamp_min(1.0)
        else:
            joint_rows = float(B)
        self.joint_rows = float(B)     # the host's copy, set from the first read when sharded
        # With the default (uniform, positive) row marginal no row needs a mask.
        self.uniform_a = a is None
        self.a = self._marginal('a', a, B, device, joint_rows)
        self.b = self._marginal('b', b, K, device, float(K))
        self._log_a: Optional[torch.Tensor] = None
        self._log_b64: Optional[torch.Tensor] = None
        # The initial kernel is the row softmax of -M/eps: g = 0, f_i = -eps logsumexp_j(-M_ij/eps),
        # every entry <= 1, rows summing to 1, so u = a is already the first row update.
        # In place in one buffer (aten's softmax.out): a second fresh B x K tensor would cost
        # its page faults, which doubled the time of this pass on the CPU (measured).
        self.kernel = torch.mul(M, -1.0 / eps)
        torch._softmax(self.kernel, 1, False, out=self.kernel)
        self.kernel_t = self.kernel.t()    # a view: in-place rebuilds of the kernel show through
        self.f: Optional[torch.Tensor] = None
        self.g: Optional[torch.Tensor] = None    # zeros until the first absorption
        self.mixer = _AndersonMixer(anderson)
        self.accelerate = False
        self.u, self.v, self.Kv, self.log_v = self.a, None, None, None
        self.col = dist.all_reduce_sum(torch.mv(self.kernel_t, self.a), self.group)
        # Column error of the start (v = 1): with the first block's, the rate of plain iterations.
        self.input_checks['start_err'] = torch.dist(self.col, self.b, 1)

    @property
    def log_a(self) -> torch.Tensor:
        if self._log_a is None:
            self._log_a = torch.log(self.a)  # -inf where a == 0: those rows get no mass
        return self._log_a

    @property
    def log_b64(self) -> torch.Tensor:
        if self._log_b64 is None:
            self._log_b64 = torch.log(self.b).double()
        return self._log_b64

    def _potential_g(self) -> torch.Tensor:
        if self.g is None:
            self.g = torch.zeros_like(self.b)
        return self.g

    # ---------------------------------------------------------------- inputs
    def _check_cost(self) -> None:
        M = self.M
        if self.sharded:
            if M.shape[0] == 0:
                lo = hi = M.new_zeros(())
            else:
                lo, hi = torch.aminmax(M)
            finite = torch.isfinite(hi - lo)
            stats = torch.stack([torch.where(finite, -lo, 0.0), torch.where(finite, hi, 0.0),
                                 (~finite).float()])
            stats = dist.all_reduce_max(stats, self.group)
            self.input_checks['cost_nonfinite'] = stats[2]
            self.input_checks['cost_range'] = stats[0] + stats[1]
        else:
            # max - min is NaN or inf exactly when an entry is (aminmax propagates NaN).
            lo, hi = torch.aminmax(M)
            self.input_checks['cost_range'] = hi - lo

    def _marginal(self, name, value, size, device, total) -> torch.Tensor:
        if value is None:
            if isinstance(total, torch.Tensor):
                return torch.ones(size, dtype=torch.float32, device=device) / total
            return torch.full((size,), 1.0 / total, dtype=torch.float32, device=device)
        value = torch.as_tensor(value, device=device).to(torch.float32)
        if value.shape != (size,):
            raise ValueError(f'{name} must have shape ({size},) to match the cost, got {tuple(value.shape)}')
        bad = (~torch.isfinite(value) | (value < 0)).sum().float()
        mass = torch.where(torch.isfinite(value), value, 0.0).sum()
        if name == 'a':
            bad, mass = dist.all_reduce_sum(bad, self.group), dist.all_reduce_sum(mass, self.group)
        self.input_checks[f'{name}_bad'] = bad
        self.input_checks[f'{name}_mass'] = mass
        return value

    def _raise_on_bad_input(self, read: Dict[str, float]) -> None:
        if read.get('cost_nonfinite', 0.0) or not math.isfinite(read['cost_range']):
            check_finite('cost', self.M)  # names the count on this rank
            raise ValueError('cost must be finite, but another rank holds NaN or inf entries')
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
        for name in ('a', 'b'):
            if read.get(f'{name}_bad', 0.0):
                raise ValueError(f'{name} must be finite and non-negative, but {int(read[f"{name}_bad"])} '
                                 'of its entries are not')
        if 'a_mass' in read or 'b_mass' in read:
            mass_a = read.get('a_mass', 1.0)
            mass_b = read.get('b_mass', 1.0)
            if abs(mass_a - mass_b) > 1e-4 * max(mass_a, mass_b):
                raise ValueError(f'the marginals must have equal total mass, got sum(a)={mass_a:.6g} '
                                 f'and sum(b)={mass_b:.6g}')

    # ------------------------------------------------------------ iterations
    def _set_scalings(self, u, v) -> None:
        """New ``u, v`` (with ``log v`` in float64 for Anderson mixing: fp32 would round ``v``
        to ``|log v| * 6e-8`` relative, an error floor of ~1e-6 once ``|log v|`` reaches ~20),
        and the products that go with them."""
        self.u, self.v = u, v
        self.log_v = torch.log(v).double()
        self.Kv = torch.mv(self.kernel, v)
        self.col = dist.all_reduce_sum(torch.mv(self.kernel_t, u), self.group)  # (K,) joint K^T u
        self.mixer.reset()

    def _row_update(self) -> None:
        self.u, self.Kv, self.col = _row_update(self.kernel, self.kernel_t, self.a, self.v,
                                                not self.uniform_a, self.group)

    def _iterate(self) -> None:
        """One column update and one exact row update: a fixed kernel sequence (plain, or
        Anderson-mixed once :attr:`accelerate` is on)."""
        if not self.accelerate:
            self.u, self.v, self.Kv, self.col = plain_iteration(
                self.kernel, self.kernel_t, self.a, self.b, self.col, not self.uniform_a, self.group)
            return
        err = (self.v * self.col - self.b).abs().sum()
        # The plain column update of log v, centred: the plan is blind to a constant added to
        # log v (the row update takes it back out of u), and without centring the mixing of
        # images that differ by such constants can drift log v until the scalings overflow.
        image = self.log_b64 - torch.log(self.col.double())
        image = image - image.mean()
        self.log_v = self.mixer.step(self.log_v, image, err)
        self.v = torch.exp(self.log_v).float()
        self._row_update()

    def _start_anderson(self) -> None:
        self.accelerate = True
        self.log_v = torch.log(self.v).double()
        self.mixer.reset()

    def _lean_state(self) -> bool:
        # While the kernel is the initial row softmax (rows sum to 1), K v lies between min v
        # and max v, so u = a / K v is bounded by a / max v and a / min v: the range of v and
        # of a bound those of both scalings, and no pass over u is needed.
        return self.f is None and self.uniform_a

    def _state(self) -> Dict[str, torch.Tensor]:
        """Errors and the range of the scalings, as device scalars (same on every rank)."""
        col_err = torch.dist(self.v * self.col, self.b, 1)
        row_err = dist.all_reduce_sum(torch.dist(self.u * self.Kv, self.a, 1), self.group)
        state = dict(col_err=col_err, row_err=row_err)
        if self.accelerate:
            state['accepted_err'] = self.mixer.accepted(self.v.device)
        if self._lean_state():
            state['v_min'], state['v_max'] = torch.aminmax(self.v)
        else:
            log_u = torch.where(self.a > 0, torch.log(self.u), 0.0)
            log_range = torch.cat([log_u, torch.log(self.v)]).abs().amax()
            state['log_range'] = dist.all_reduce_max(log_range, self.group)
        return state

    def _log_range(self, read: Dict[str, float]) -> float:
        if 'log_range' in read:
            return read['log_range']
        v_min, v_max = read['v_min'], read['v_max']
        if not (v_min > 0 and math.isfinite(v_max)):
            return math.inf
        log_a = -math.log(self.joint_rows)
        return max(abs(math.log(v_min)), abs(math.log(v_max)),
                   abs(log_a - math.log(v_max)), abs(log_a - math.log(v_min)))

    def _first_decision(self) -> int:
        """Iterations after which the first plain-or-Anderson decision is taken: on small
        problems the rate over the first 4 iterations (so that the decision, and the iterates,
        do not depend on ``check_every`` when it divides 4), on large ones the first block's."""
        return 1 if self.joint_rows * self.M.shape[1] >= _LARGE_PROBLEM else 4

    def _plain_is_slow(self, err: float, previous: float, block: int) -> bool:
        """Whether plain iterations, at the rate of the last block, need more than
        ``_PLAIN_ENOUGH`` more iterations to meet ``tol`` (the same decision on every rank)."""
        if not err > self.tol:
            return False
        if not (previous > 0 and err < previous):
            return True
        rate = (err / previous) ** (1.0 / block)
        remaining = math.log(self.tol / err) / math.log(rate) if rate > 0 else 0.0
        large = self.joint_rows * self.M.shape[1] >= _LARGE_PROBLEM
        return remaining > (_PLAIN_ENOUGH_LARGE if large else _PLAIN_ENOUGH)

    def run(self, max_iters: int, check_every: int, row_normalized: bool = False
            ) -> Tuple[torch.Tensor, SinkhornInfo]:
        iters = absorptions = reads = previous_iters = 0
        previous_err = math.nan
        while True:
            block = min(check_every, max_iters - iters)
            for _ in range(block):
                self._iterate()
            iters += block
            state = self._state()
            if reads == 0:
                state.update(self.input_checks)
            read = _read(state)
            reads += 1
            if reads == 1:
                self._raise_on_bad_input(read)
                self.joint_rows = max(read.get('joint_rows', self.joint_rows), 1.0)
                previous_err = read['start_err']
            log_range = self._log_range(read)
            if not all(math.isfinite(x) for x in (read['col_err'], read['row_err'], log_range)):
                # A scaling over- or underflowed in this block: exact log-domain update instead.
                self._log_domain_update()
                absorptions += 1
                previous_err, previous_iters = math.nan, iters
                if iters < max_iters:
                    continue
                read = _read(self._state())
                reads += 1
            converged = max(read['col_err'], read['row_err']) <= self.tol
            if converged or iters >= max_iters:
                break
            # Plain or Anderson: the rate since the last decision (or the start) predicts the
            # plain iterations left.
            if not self.accelerate and self.mixer.depth > 0 and iters >= self._first_decision():
                if self._plain_is_slow(read['col_err'], previous_err, iters - previous_iters):
                    self._start_anderson()
                previous_err, previous_iters = read['col_err'], iters
            # Absorb large scalings, but not those of an extrapolation that the next step's
            # safeguard will reject (col_err above the last accepted error): folded into the
            # kernel it could not be undone. Past 1e30 there is no choice left.
            if log_range > _LOG_ABSORB_LAST or (
                    log_range > _LOG_ABSORB and not read['col_err'] > read.get('accepted_err', math.inf)):
                self._absorb()
                absorptions += 1
        if row_normalized:
            # T_ij / a_i = K_ij v_j / (K v)_i: the last row update set u = a / K v.
            plan = self.kernel.mul_(self.v).div_(self.Kv.unsqueeze(1))
        else:
            plan = self.kernel.mul_(self.u.unsqueeze(1)).mul_(self.v)
        err = max(read['row_err'], read['col_err'])
        info = SinkhornInfo(iterations=iters, marginal_error=err, row_error=read['row_err'],
                            col_error=read['col_err'], converged=err <= self.tol,
                            absorptions=absorptions, host_reads=reads)
        return plan, info

    # ------------------------------------------------------------ absorption
    def _rebuild_kernel(self, u) -> None:
        M, eps = self.M, self.eps
        torch.sub(self.f[:, None], M, out=self.kernel).add_(self.g[None, :]).div_(eps).exp_()
        self._set_scalings(u, torch.ones_like(self.b))

    def _absorb(self) -> None:
        """Fold finite scalings into the potentials: ``f += ε log u``, ``g += ε log v``."""
        eps = self.eps
        g = self._potential_g()
        if self.f is None and self.M.shape[0] > 0:
            # Row potentials of the initial softmax, read off each row's largest entry
            # (>= 1/K, so its logarithm is exact): f_i = eps log K_ij + M_ij - g_j.
            k_max, j_max = self.kernel.max(dim=1)
            self.f = eps * torch.log(k_max) + self.M.gather(1, j_max[:, None]).squeeze(1) - g[j_max]
        elif self.f is None:
            self.f = self.M.new_zeros(0)
        self.f = self.f + eps * torch.log(torch.where(self.u > 0, self.u, 1.0))
        self.g = g + eps * torch.log(self.v)
        self._rebuild_kernel(torch.where(self.a > 0, 1.0, 0.0))

    def _log_domain_update(self) -> None:
        """Exact potentials from the cost alone (immune to under/overflow of ``u, v, K``): a
        row, a column and a row update in the log domain, after which rows sum to ``a``."""
        M, eps = self.M, self.eps
        g = self._potential_g()
        g = g if self.f is None else torch.where(torch.isfinite(g), g, 0.0)
        f = eps * (self.log_a - torch.logsumexp((g[None, :] - M) / eps, dim=1))
        f = torch.where(torch.isfinite(f), f, 0.0)  # rows with a_i = 0
        self.g = eps * (torch.log(self.b) - _logsumexp_joint((f[:, None] - M) / eps, self.group))
        f = eps * (self.log_a - torch.logsumexp((self.g[None, :] - M) / eps, dim=1))
        self.f = torch.where(torch.isfinite(f), f, 0.0)
        self._rebuild_kernel(torch.where(self.a > 0, 1.0, 0.0))
        if self.accelerate:
            self.log_v = torch.log(self.v).double()


class _AndersonMixer:
    r"""Safeguarded Anderson acceleration (type II) of a fixed-point iteration :math:`x \mapsto G(x)`.

    Keeps the last ``depth + 1`` images :math:`G(x_k)` and residuals :math:`r_k = G(x_k) - x_k`
    and proposes :math:`\sum_k \alpha_k G(x_k)` with :math:`\alpha = \arg\min \|\sum_k
    \alpha_k r_k\|_2` subject to :math:`\sum_k \alpha_k = 1` (Walker & Ni, "Anderson
    acceleration for fixed-point iterations", SINUM 2011). Residuals are centred first: the
    Sinkhorn column map is blind to a constant added to ``log v``.

    Safeguard: an iterate whose error is larger than that of the last accepted one is
    rejected, and the plain step :math:`G(x)` from the last accepted iterate is taken instead
    (and accepted whatever its error), so a bad extrapolation costs one iteration and the
    method never does much worse than plain Sinkhorn. ``depth = 0`` is plain Sinkhorn.

    Every step is the same sequence of tensor operations: the history is a ring of
    ``depth + 1`` slots with a 0/1 mask of the slots in use, the least-squares system is solved
    over all slots (unused ones decoupled by an identity row), and the safeguard's choices are
    ``torch.where``s on device scalars; nothing is read back to the host.
    """

    def __init__(self, depth: int):
        self.depth = depth
        self.count = 0      # steps taken: the slot written next is count % (depth + 1)
        self.images = None  # (depth+1, n) G(x_k); residuals likewise; gram (depth+1, depth+1)

    def reset(self) -> None:
        """Forget everything (after the kernel was rebuilt, old iterates mean nothing)."""
        self.images = None
        self.count = 0

    def accepted(self, device: torch.device) -> torch.Tensor:
        """Error of the last accepted iterate (a device scalar; inf if none)."""
        if self.images is None or self.depth == 0:
            return torch.tensor(math.inf, dtype=torch.float64, device=device)
        return self.accepted_error

    def step(self, x: torch.Tensor, gx: torch.Tensor, error) -> torch.Tensor:
        """Next iterate, given the current one ``x``, its image ``gx`` and its error (a
        number or a device scalar)."""
        if self.depth == 0:
            return gx
        slots = self.depth + 1
        error = torch.as_tensor(error, dtype=torch.float64, device=gx.device)
        if self.images is None:
            self.images = gx.new_zeros((slots, gx.numel()))
            self.residuals = gx.new_zeros((slots, gx.numel()))
            self.gram = gx.new_zeros((slots, slots), dtype=torch.float64)
            self.in_use = gx.new_zeros(slots, dtype=torch.float64)
            self.accepted_error = torch.full((), math.inf, dtype=torch.float64, device=gx.device)
            self.accepted_image = gx
            self.took_plain = torch.zeros((), dtype=torch.bool, device=gx.device)
            self.one_hot = torch.eye(slots, dtype=torch.float64, device=gx.device)
        reject = (error > self.accepted_error) & ~self.took_plain
        slot = self.count % slots
        self.count += 1
        # The new pair goes into its slot whatever happens: a rejection empties the history.
        r = self.residuals[slot]
        torch.sub(gx, x, out=r)
        r.sub_(r.mean())
        self.images[slot] = gx
        # Only the new row of the Gram matrix R R^T is computed; slot order does not matter.
        dots = (self.residuals @ r).double()
        self.gram[slot] = dots
        self.gram[:, slot] = dots
        in_use = torch.maximum(self.in_use, self.one_hot[slot])
        in_use = torch.where(reject, 0.0, in_use)
        gram = self.gram * (in_use[:, None] * in_use[None, :])
        # Tikhonov term relative to the residual scale keeps the tiny system well posed.
        ridge = _ANDERSON_RIDGE * gram.diagonal().sum() + 1e-300
        system = gram + torch.diag(in_use * ridge + (1.0 - in_use))
        weights = torch.linalg.solve_ex(system, in_use[:, None])[0][:, 0]
        total = weights.sum()
        usable = torch.isfinite(total) & (total != 0)
        mixed = (weights / torch.where(usable, total, 1.0)).to(gx.dtype) @ self.images
        self.in_use = torch.where(usable | reject, in_use, 0.0)
        out = torch.where(reject, self.accepted_image, torch.where(usable, mixed, gx))
        self.accepted_error = torch.where(reject, self.accepted_error, error)
        self.accepted_image = torch.where(reject, self.accepted_image, gx)
        self.took_plain = reject
        return out


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
