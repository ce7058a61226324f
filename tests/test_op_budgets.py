"""Dispatched-operator budgets of the hot path, counted (forward + backward), not guessed.

On a GPU every dispatched operator is a kernel launch (~5-10 µs of CPU time), so at the batch
sizes people train with the losses are bound by launches. :class:`vlp_codebook.profiling.OpCounter`
counts every ``aten`` call, views and the backward pass included. Budgets at B 64, K 128, d 256:

* ``CodebookOTLoss`` (teacher plans, usage statistics on): ``125 + 10 x`` the Sinkhorn iterations
  of its two solves (plain iterations: 4 kernels, and a 6-kernel check each on the CPU),
  so at most 225 <= 250 when each solve takes <= 5 iterations (994 before the lean path);
* ``MultiDirectionalDistillationLoss`` (4 directions, FeatureQueues of 1024 with ids, image
  ids): <= 100, budget 200 (340 before).
"""
import sys

import pytest
import torch
from torch.nn import functional as F

from vlp_codebook.models.losses.codebook_ot_loss import CodebookOTLoss
from vlp_codebook.models.losses.distillation import MultiDirectionalDistillationLoss
from vlp_codebook.models.teachers import FeatureQueue
from vlp_codebook.ot import sinkhorn
from vlp_codebook.profiling import OpCounter

sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
from test_ot_sinkhorn import _problem  # noqa: E402

B, K, D = 64, 128, 256
CODEBOOK_FIXED, CODEBOOK_PER_ITERATION = 125, 10


def _features(seed):
    g = torch.Generator().manual_seed(seed)
    zv = torch.randn(B, D, generator=g).requires_grad_()
    zt = torch.randn(B, D, generator=g).requires_grad_()
    tv = zv.detach() + 0.1 * torch.randn(B, D, generator=g)
    tt = zt.detach() + 0.1 * torch.randn(B, D, generator=g)
    return zv, zt, tv, tt


def _count(step):
    step()                       # lazy set-up (caches) happens on the first call
    with OpCounter() as ops:
        step()
    return ops


@pytest.mark.parametrize('tol', [1e-2, 1e-4, 1e-6])
def test_codebook_loss_ops_are_fixed_plus_ten_per_sinkhorn_iteration(tol):
    torch.manual_seed(0)
    loss_fn = CodebookOTLoss(num_codewords=K, embed_dim=D, sinkhorn_tol=tol).train()
    zv, zt, tv, tt = _features(0)
    ops = _count(lambda: sum(loss_fn(zv, zt, tv, tt).values()).backward())
    iterations = loss_fn.last_stats['sinkhorn_iters_image'] + loss_fn.last_stats['sinkhorn_iters_text']
    assert ops.total <= CODEBOOK_FIXED + CODEBOOK_PER_ITERATION * iterations, ops.top()
    # short solves run plain Sinkhorn: no Anderson system is solved
    assert 'linalg_solve_ex' not in ops.counts and '_linalg_solve_ex' not in ops.counts
    # a dtype cast is a kernel too: everything is fp32 already
    assert ops.counts.get('_to_copy', 0) == 0, ops.top()


def test_codebook_budget_at_five_iterations_per_solve():
    assert CODEBOOK_FIXED + CODEBOOK_PER_ITERATION * (5 + 5) <= 250


def test_distillation_loss_ops():
    torch.manual_seed(0)
    loss_fn = MultiDirectionalDistillationLoss()
    queues = [FeatureQueue(1024, D, with_ids=True) for _ in range(2)]
    for queue in queues:
        queue.enqueue(F.normalize(torch.randn(1024, D), dim=1), ids=torch.randint(0, 5000, (1024,)))
    zv, zt, tv, tt = _features(1)
    ids = torch.randint(0, 5000, (B,))

    def step():
        out = loss_fn(image_feats=zv, text_feats=zt, image_teacher_feats=tv, text_teacher_feats=tt,
                      image_queue=queues[0], text_queue=queues[1], image_ids=ids, alpha=0.4)
        sum(out.values()).backward()
    ops = _count(step)
    assert ops.total <= 100, ops.top()     # budget 200; 340 before the lean path


def test_a_long_solve_switches_to_anderson_and_a_short_one_does_not():
    cost, _, _ = _problem(0, 48, 40)
    cost = torch.tensor(cost, dtype=torch.float32)
    with OpCounter() as short_ops:
        _, short = sinkhorn(cost, 0.5, tol=1e-4, return_info=True)
    with OpCounter() as long_ops:
        _, long = sinkhorn(cost, 0.01, tol=1e-6, max_iters=5000, return_info=True)
    assert short.converged and long.converged and long.iterations > 3 * short.iterations
    assert 'linalg_solve_ex' not in short_ops.counts
    assert long_ops.counts.get('linalg_solve_ex', 0) + long_ops.counts.get('_linalg_solve_ex', 0) > 0


def test_row_normalized_plan_is_the_plan_over_its_row_marginal():
    cost, _, _ = _problem(3, 20, 30)
    cost = torch.tensor(cost, dtype=torch.float32)
    plan = sinkhorn(cost, 0.1, tol=1e-6)
    rows = sinkhorn(cost, 0.1, tol=1e-6, row_normalized=True)
    torch.testing.assert_close(rows, plan * 20, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rows.sum(1), torch.ones(20), rtol=1e-5, atol=0)


def test_l2_normalize_has_the_values_and_gradient_of_f_normalize():
    from vlp_codebook.models.losses.functional import l2_normalize
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(l2_normalize(x), F.normalize(x, dim=1))
    ours = torch.autograd.grad((l2_normalize(x) * weights).sum(), x)[0]
    reference = torch.autograd.grad((F.normalize(x, dim=1) * weights).sum(), x)[0]
    torch.testing.assert_close(ours, reference)
    assert torch.autograd.gradcheck(lambda t: l2_normalize(t), (x,))


def test_batch_weight_is_one_on_a_single_process():
    from vlp_codebook import dist
    assert dist.batch_weight(5) == 1.0 and dist.batch_weight(torch.tensor(3)) == 1.0
