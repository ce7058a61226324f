"""Properties of vlp_codebook.ot.sinkhorn, checked against float64 references and POT."""
import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vlp_codebook.ot import sinkhorn, transport_cost


def _problem(seed, B, K, scale=2.0):
    rng = np.random.default_rng(seed)
    cost = rng.uniform(0.0, scale, size=(B, K))
    return cost, np.full(B, 1.0 / B), np.full(K, 1.0 / K)


def _errors(plan, a, b):
    plan = plan.double().numpy()
    return np.abs(plan.sum(1) - a).sum(), np.abs(plan.sum(0) - b).sum()


shapes = st.tuples(st.integers(1, 48), st.integers(1, 48))


# Costs up to 2 (cosine costs of unit-norm features lie in [0, 2]) and ε >= 0.02: the loss's
# range. Uniformly random costs spanning 5 at ε 0.02 are near-permutation problems no caller
# poses, on which plain and mixed iterations alike need tens of thousands of iterations.
@given(shape=shapes, eps=st.floats(0.02, 1.0), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([0.5, 1.0, 2.0]))
def test_plan_is_nonnegative_and_meets_marginals(shape, eps, seed, scale):
    cost, a, b = _problem(seed, *shape, scale=scale)
    tol = 1e-5
    plan, info = sinkhorn(torch.tensor(cost, dtype=torch.float32), eps, tol=tol, max_iters=20000,
                          return_info=True)
    assert plan.dtype == torch.float32 and plan.shape == shape
    assert (plan >= 0).all()
    row_err, col_err = _errors(plan, a, b)
    # fp32 sums add a rounding error of order 1e-7 on top of the solver's tolerance.
    assert info.converged
    assert row_err <= tol + 1e-6 and col_err <= tol + 1e-6
    assert abs(info.marginal_error - max(row_err, col_err)) < 1e-6


@given(shape=shapes, eps=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1))
def test_plan_agrees_with_pot_float64(shape, eps, seed):
    cost, a, b = _problem(seed, *shape)
    ref = ot.sinkhorn(a, b, cost, eps, stopThr=1e-12, numItermax=200000)
    ours = sinkhorn(torch.tensor(cost), eps, tol=1e-6, max_iters=20000)
    # Both are the same Gibbs-form plan; the L1 distance is bounded by the marginal tolerances.
    assert np.abs(ours.double().numpy() - ref).sum() < 2e-4


@given(shape=shapes, eps=st.floats(0.02, 1.0), seed=st.integers(0, 2**31 - 1),
       shift=st.floats(-3.0, 3.0), row=st.integers(0, 47))
def test_constant_added_to_a_row_leaves_plan_unchanged(shape, eps, seed, shift, row):
    cost, _, _ = _problem(seed, *shape)
    row = row % shape[0]
    shifted = cost.copy()
    shifted[row] += shift
    p1 = sinkhorn(torch.tensor(cost), eps, tol=1e-6, max_iters=20000)
    p2 = sinkhorn(torch.tensor(shifted), eps, tol=1e-6, max_iters=20000)
    # Rounding differs between the two problems, so Anderson mixing takes slightly different
    # paths to the same plan: they agree to within the 1e-6 marginal tolerance, not bitwise.
    # A solver that mishandled the shift would move the plan by O(1/B) per entry.
    assert (p1 - p2).abs().sum().item() < 2e-5


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize('eps', [1e-3, 0.05, 1.0])
def test_low_precision_inputs_and_tiny_epsilon_stay_finite(dtype, eps):
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=1)
    cost = (1 - z @ c.T).to(dtype)
    plan, info = sinkhorn(cost, eps, tol=1e-4, max_iters=50000, return_info=True)
    assert plan.dtype == torch.float32
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    assert info.converged, info
    # At ε = 1e-3 the plan is nearly a permutation-like assignment; marginals still hold.
    row_err, col_err = _errors(plan, np.full(40, 1 / 40), np.full(24, 1 / 24))
    assert max(row_err, col_err) <= 1e-4 + 1e-6


def test_extreme_cost_ranges_use_absorption_and_stay_exact():
    # exp(-M/ε) spans e^-20000 here: plain scaling would underflow to zero rows.
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(30, 20, generator=g) * 20.0
    plan, info = sinkhorn(cost, 1e-3, tol=1e-4, max_iters=50000, return_info=True)
    assert torch.isfinite(plan).all()
    assert info.converged and info.absorptions > 0


def test_under_autocast_plan_is_fp32():
    cost = torch.rand(8, 6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        plan = sinkhorn(cost.bfloat16(), 0.1)
    assert plan.dtype == torch.float32


def test_plan_carries_no_gradient():
    cost = torch.rand(8, 6, requires_grad=True)
    plan = sinkhorn(cost, 0.1)
    assert not plan.requires_grad


def test_not_converged_warns_and_reports():
    cost = torch.rand(50, 40) * 5
    with pytest.warns(RuntimeWarning, match='marginal error'):
        _, info = sinkhorn(cost, 1e-3, max_iters=2, return_info=True)
    assert info.iterations == 2 and not info.converged and info.marginal_error > 1e-4


def test_fixed_three_iterations_do_not_meet_marginals():
    # The reason this module exists: SwAV's 3 iterations leave a visible marginal error.
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(256, 32, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    cost = 1 - z @ c.T
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        _, truncated = sinkhorn(cost, 0.05, max_iters=3, anderson=0, return_info=True)
    _, converged = sinkhorn(cost, 0.05, return_info=True)
    assert truncated.marginal_error > 1e-3 > 1e-4 >= converged.marginal_error


def _clustered_cost(B, K, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    codewords = torch.nn.functional.normalize(torch.randn(K, dim, generator=g), dim=1)
    idx = torch.randint(0, K, (B,), generator=g)
    feats = torch.nn.functional.normalize(codewords[idx] + 0.1 * torch.randn(B, dim, generator=g), dim=1)
    return 1 - feats @ codewords.T


def test_anderson_acceleration_saves_iterations_and_finds_the_same_plan():
    cost = _clustered_cost(256, 512)
    plain, plain_info = sinkhorn(cost, 0.02, tol=1e-5, anderson=0, return_info=True)
    fast, fast_info = sinkhorn(cost, 0.02, tol=1e-5, anderson=3, return_info=True)
    assert plain_info.converged and fast_info.converged
    assert fast_info.iterations < plain_info.iterations
    assert (plain - fast).abs().sum().item() < 1e-4


def test_anderson_converges_where_plain_sinkhorn_stalls():
    # A near-permutation problem: plain Sinkhorn's error shrinks by ~1e-4 per iteration here
    # (POT's float64 solver needs ~1e6 iterations for 1e-8); the safeguarded mixing does not.
    cost, a, b = _problem(0, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        _, plain = sinkhorn(torch.tensor(cost), 0.02, tol=1e-6, max_iters=500, anderson=0, return_info=True)
    plan, fast = sinkhorn(torch.tensor(cost), 0.02, tol=1e-6, max_iters=500, anderson=3, return_info=True)
    assert not plain.converged and fast.converged
    row_err, col_err = _errors(plan, a, b)
    assert max(row_err, col_err) <= 1e-6 + 1e-7


def _anderson_reference(xs, gs):
    """Anderson mixing in its classic difference form (Walker & Ni 2011, eq. 4.1), written
    independently of the solver's Gram-matrix form: x+ = g_n - sum_j gamma_j (g_{j+1} - g_j),
    gamma the least-squares fit of r_n by the residual differences (residuals centred)."""
    rs = [g - x for x, g in zip(xs, gs)]
    rs = [r - r.mean() for r in rs]
    if len(rs) == 1:
        return gs[0]
    dR = torch.stack([rs[j + 1] - rs[j] for j in range(len(rs) - 1)], dim=1)
    dG = torch.stack([gs[j + 1] - gs[j] for j in range(len(gs) - 1)], dim=1)
    gamma = torch.linalg.lstsq(dR, rs[-1][:, None]).solution
    return gs[-1] - (dG @ gamma)[:, 0]


@given(seed=st.integers(0, 2**31 - 1), depth=st.integers(1, 4), n=st.integers(6, 30))
def test_anderson_mixer_matches_the_classic_difference_form(seed, depth, n):
    from vlp_codebook.anderson import RIDGE as _ANDERSON_RIDGE, AndersonMixer as _AndersonMixer
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) * (0.5 / n ** 0.5)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    mixer, x, xs, gs = _AndersonMixer(depth), torch.zeros(n, dtype=torch.float64), [], []
    for step in range(8):
        gx = A @ x + c
        xs, gs = (xs + [x])[-(depth + 1):], (gs + [gx])[-(depth + 1):]
        # Decreasing errors: every iterate is accepted, so the history is the last depth + 1.
        x_next = mixer.step(x, gx, error=1.0 / (step + 1))
        # The mixer's ridge (lambda = _ANDERSON_RIDGE * trace of the residual Gram matrix) moves
        # the weights by about lambda / sigma_min, i.e. ~ridge * cond(Gram) relative; the
        # proposal moves by that times the spread of the images. 100x margin; the observed
        # worst case over 6400 histories was 6.5x. Past cond 1e6 the fit is the ridge's, not
        # the unregularised one's, so the comparison stops there.
        residuals = torch.stack([(gk - xk) - (gk - xk).mean() for xk, gk in zip(xs, gs)], dim=1)
        cond = torch.linalg.cond(residuals.T @ residuals).item()
        if cond > 1e6:
            break
        spread = (torch.stack(gs, dim=1) - gx[:, None]).abs().max().item()
        atol = 100 * _ANDERSON_RIDGE * cond * spread + 1e-12
        torch.testing.assert_close(x_next, _anderson_reference(xs, gs), rtol=0, atol=atol)
        x = x_next


def test_anderson_reference_check_catches_a_wrong_mixer():
    # The tolerance above is tight enough to tell mixing from plain steps and from stale weights.
    g = torch.Generator().manual_seed(1)
    n = 10
    A = torch.randn(n, n, generator=g, dtype=torch.float64) * (0.5 / n ** 0.5)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    xs = [torch.zeros(n, dtype=torch.float64)]
    gs = [A @ xs[0] + c]
    xs.append(gs[0])
    gs.append(A @ xs[1] + c)
    from vlp_codebook.anderson import RIDGE as _ANDERSON_RIDGE
    residuals = torch.stack([(gk - xk) - (gk - xk).mean() for xk, gk in zip(xs, gs)], dim=1)
    cond = torch.linalg.cond(residuals.T @ residuals).item()
    spread = (gs[1] - gs[0]).abs().max().item()
    atol = 100 * _ANDERSON_RIDGE * cond * spread + 1e-12
    mixed = _anderson_reference(xs, gs)
    assert (mixed - gs[-1]).abs().max() > 1e3 * atol  # plain step is far outside the tolerance
    assert (mixed - 0.5 * (gs[0] + gs[1])).abs().max() > 1e3 * atol


def test_anderson_mixer_rejects_an_iterate_whose_error_grew():
    from vlp_codebook.anderson import AndersonMixer as _AndersonMixer
    mixer = _AndersonMixer(3)
    x0, g0 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    x1 = mixer.step(x0, g0, error=1.0)
    bad_image = torch.full((4,), 7.0, dtype=torch.float64)
    # Error grew: go back to the plain step from the last accepted iterate (g0) ...
    assert torch.equal(mixer.step(x1, bad_image, error=2.0), g0)
    # ... and accept that plain step's result whatever its error.
    assert torch.equal(mixer.step(g0, bad_image, error=3.0), bad_image)


def test_transport_cost_is_frobenius_product():
    plan = torch.tensor([[0.25, 0.25], [0.0, 0.5]])
    cost = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert transport_cost(plan, cost).item() == pytest.approx(0.25 + 0.5 + 2.0)
    with pytest.raises(ValueError, match='same shape'):
        transport_cost(plan, cost[:1])


@pytest.mark.parametrize('kwargs, match', [
    (dict(cost=torch.tensor([[0.1, float('nan')]]), epsilon=0.1), 'cost must be finite'),
    (dict(cost=torch.tensor([[0.1, float('inf')]]), epsilon=0.1), 'cost must be finite'),
    (dict(cost=torch.rand(3), epsilon=0.1), 'cost must be a 2-D tensor'),
    (dict(cost=torch.rand(3, 0), epsilon=0.1), 'at least one column'),
    (dict(cost=torch.rand(3, 2), epsilon=0.0), 'epsilon must be a positive'),
    (dict(cost=torch.rand(3, 2), epsilon=-1.0), 'epsilon must be a positive'),
    (dict(cost=torch.rand(3, 2), epsilon=float('nan')), 'epsilon must be a positive'),
    (dict(cost=torch.rand(3, 2), epsilon=0.1, anderson=-1), 'anderson must be an int >= 0'),
    (dict(cost=torch.rand(3, 2), epsilon=0.1, anderson=1.5), 'anderson must be an int >= 0'),
    (dict(cost=torch.rand(3, 2), epsilon=0.1, tol=0.0), 'tol must be > 0'),
    (dict(cost=torch.rand(3, 2), epsilon=0.1, check_every=0), 'check_every must be an int >= 1'),
    (dict(cost=torch.rand(3, 2), epsilon=0.1, max_iters=0), 'max_iters must be an int >= 1'),
    (dict(cost=torch.rand(0, 2), epsilon=0.1), 'no rows'),
    # fp32 cannot resolve exp(-cost / eps) here: refused, not a plan of the wrong mass (issue 10)
    (dict(cost=torch.rand(6, 5) * 1e10, epsilon=0.05), r'cost spans .* times epsilon'),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(**kwargs)


