"""CodebookOTLoss and Codebook: values against POT, gradient flow, softmax normalisation, errors."""
import numpy as np
import ot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

from vlp_codebook.models.codebook import Codebook
from vlp_codebook.models.losses.codebook_ot_loss import CodebookOTLoss
from vlp_codebook.registry import MODELS


def _feats(seed, B, d, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, d, generator=g), dim=1).requires_grad_(requires_grad)


def _pot_assignments(feats, codewords, eps):
    cost = (1 - feats.double() @ codewords.double().T).numpy()
    B, K = cost.shape
    plan = ot.sinkhorn(np.full(B, 1 / B), np.full(K, 1 / K), cost, eps, stopThr=1e-12, numItermax=100000)
    return torch.tensor(plan * B)


def test_builds_from_registry_by_name():
    loss = MODELS.build(dict(type='CodebookOTLoss', num_codewords=16, embed_dim=8, epsilon=0.1))
    assert isinstance(loss, CodebookOTLoss) and loss.codebook.weight.shape == (16, 8)
    loss = MODELS.build(dict(type='CodebookOTLoss', codebook=dict(type='Codebook', num_codewords=5, embed_dim=3)))
    assert loss.codebook.num_codewords == 5


def test_unknown_type_lists_known_types():
    with pytest.raises(KeyError) as err:
        MODELS.build(dict(type='CodebookOTLos'))
    msg = str(err.value)
    assert "'CodebookOTLos'" in msg and 'CodebookOTLoss' in msg and 'Known types' in msg


@pytest.mark.parametrize('ot_cost_features', ['plan', 'student'])
@pytest.mark.parametrize('plan_from_teacher', [False, True])
def test_terms_match_independent_float64_reference(plan_from_teacher, ot_cost_features):
    B, K, d, eps, tau = 24, 12, 8, 0.1, 0.2
    loss_fn = CodebookOTLoss(num_codewords=K, embed_dim=d, epsilon=eps, temperature=tau,
                             sinkhorn_tol=1e-7, sinkhorn_max_iters=20000, ot_cost_features=ot_cost_features)
    zv, zt = _feats(0, B, d), _feats(1, B, d)
    tv, tt = (_feats(2, B, d), _feats(3, B, d)) if plan_from_teacher else (zv, zt)
    out = loss_fn(zv, zt, tv if plan_from_teacher else None, tt if plan_from_teacher else None)
    C = F.normalize(loss_fn.codebook.weight.detach(), dim=1)
    q_v, q_t = _pot_assignments(tv, C, eps), _pot_assignments(tt, C, eps)
    logp_v = torch.log_softmax(zv.double() @ C.double().T / tau, 1)
    logp_t = torch.log_softmax(zt.double() @ C.double().T / tau, 1)
    # Swapped prediction: the image is scored against the text's plan and vice versa.
    assert out['loss_i2p'].item() == pytest.approx(-(q_t * logp_v).sum(1).mean().item(), rel=1e-4)
    assert out['loss_t2p'].item() == pytest.approx(-(q_v * logp_t).sum(1).mean().item(), rel=1e-4)
    # <T, M>, M from the plan's own features ('plan') or the student features ('student').
    cost_feats_v, cost_feats_t = (tv, tt) if ot_cost_features == 'plan' else (zv, zt)
    cost_v = 1 - cost_feats_v.double() @ C.double().T
    cost_t = 1 - cost_feats_t.double() @ C.double().T
    assert out['loss_ot_v'].item() == pytest.approx((q_v / B * cost_v).sum().item(), rel=1e-4)
    assert out['loss_ot_t'].item() == pytest.approx((q_t / B * cost_t).sum().item(), rel=1e-4)


def test_teacher_and_student_plans_differ():
    loss_fn = CodebookOTLoss(num_codewords=10, embed_dim=8)
    zv, zt = _feats(0, 16, 8), _feats(1, 16, 8)
    student = loss_fn(zv, zt)
    teacher = loss_fn(zv, zt, _feats(2, 16, 8), _feats(3, 16, 8))
    assert student['loss_i2p'].item() != pytest.approx(teacher['loss_i2p'].item(), rel=1e-3)


def test_gradients_reach_codebook_and_students_never_plans():
    loss_fn = CodebookOTLoss(num_codewords=10, embed_dim=8, ot_cost_features='student')
    zv, zt = _feats(0, 16, 8, True), _feats(1, 16, 8, True)
    tv, tt = _feats(2, 16, 8, True), _feats(3, 16, 8, True)
    sum(loss_fn(zv, zt, tv, tt).values()).backward()
    assert zv.grad is not None and zv.grad.abs().sum() > 0
    assert zt.grad is not None and zt.grad.abs().sum() > 0
    assert loss_fn.codebook.weight.grad.abs().sum() > 0
    assert tv.grad is None and tt.grad is None


@given(B=st.integers(1, 32), K=st.integers(1, 24), seed=st.integers(0, 10**6),
       tau=st.floats(0.01, 1.0), eps=st.floats(0.03, 1.0))
def test_assignment_and_prediction_rows_are_distributions(B, K, seed, tau, eps):
    loss_fn = CodebookOTLoss(num_codewords=K, embed_dim=6, epsilon=eps, temperature=tau,
                             sinkhorn_tol=1e-5, sinkhorn_max_iters=20000)
    z = _feats(seed, B, 6)
    q = loss_fn.assignments(z)
    assert (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(B), atol=1e-5)
    p = torch.softmax(loss_fn.codebook.similarity(z) / tau, dim=1)
    assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(B), atol=1e-5)
    out = loss_fn(z, z)
    assert all(torch.isfinite(v) for v in out.values())


def test_weights_scale_terms_and_zero_weight_drops_them():
    zv, zt = _feats(0, 16, 8), _feats(1, 16, 8)
    torch.manual_seed(0)
    base = CodebookOTLoss(num_codewords=10, embed_dim=8)
    torch.manual_seed(0)
    scaled = CodebookOTLoss(num_codewords=10, embed_dim=8, loss_weight=2.0, term_weights=dict(ot_t=0, i2p=0.5))
    a, b = base(zv, zt), scaled(zv, zt)
    assert set(b) == {'loss_i2p', 'loss_t2p', 'loss_ot_v'}
    assert b['loss_i2p'].item() == pytest.approx(a['loss_i2p'].item())          # 2.0 * 0.5
    assert b['loss_t2p'].item() == pytest.approx(2 * a['loss_t2p'].item())
    assert b['loss_ot_v'].item() == pytest.approx(2 * a['loss_ot_v'].item())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_outputs_fp32_under_autocast(dtype):
    loss_fn = CodebookOTLoss(num_codewords=10, embed_dim=8)
    zv, zt = _feats(0, 16, 8).to(dtype), _feats(1, 16, 8).to(dtype)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = loss_fn(zv, zt)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_usage_statistics_and_perplexity():
    cb = Codebook(num_codewords=4, embed_dim=3, usage_momentum=0.0)
    uniform = torch.full((8, 4), 0.25)
    cb.update_usage(uniform)
    assert cb.perplexity().item() == pytest.approx(4.0)
    one_hot = torch.zeros(8, 4)
    one_hot[:, 2] = 1
    mass = cb.update_usage(one_hot)
    assert mass.tolist() == [0, 0, 1, 0]
    assert cb.perplexity().item() == pytest.approx(1.0)


def test_code_perplexity_follows_the_students_predictions():
    # The plans' codeword mass is uniform whatever the features (equipartition), so a
    # perplexity of it would read K even for a collapsed student; the logged one does not.
    K, d = 16, 32
    loss_fn = CodebookOTLoss(num_codewords=K, embed_dim=d).train()
    codewords = F.normalize(loss_fn.codebook.weight.detach(), dim=1)
    collapsed = codewords[:1].repeat(12, 1)                  # every student feature on codeword 0
    loss_fn(collapsed, collapsed, _feats(0, 12, d), _feats(1, 12, d))
    assert loss_fn.last_stats['code_perplexity'] < 1.5
    # The EMA usage follows the predictions too (with the plans it would stay uniform).
    usage = loss_fn.codebook.usage
    assert usage.argmax().item() == 0 and usage[0].item() > 1.0 / K + 0.005
    spread = codewords.clone()                               # one instance on every codeword
    loss_fn(spread, spread, _feats(0, K, d), _feats(1, K, d))
    assert loss_fn.last_stats['code_perplexity'] > 0.8 * K


def test_code_plan_perplexity_grows_with_epsilon():
    K, d = 16, 8
    feats = _feats(0, 8, d)
    spreads = []
    for eps in (0.02, 0.1, 1.0):
        loss_fn = CodebookOTLoss(num_codewords=K, embed_dim=d, epsilon=eps).train()
        torch.manual_seed(0)
        loss_fn.codebook.weight.data.normal_()
        loss_fn(feats, feats)
        spreads.append(loss_fn.last_stats['code_plan_perplexity'])
    # 8 instances over 16 codewords with equal column mass: each row covers at least 2.
    assert 2.0 - 1e-3 <= spreads[0] < spreads[1] < spreads[2] <= K


@pytest.mark.parametrize('call, match', [
    (lambda f: f(torch.randn(4, 7), torch.randn(4, 8)), 'image_feats has feature dimension 7.*embed_dim=8'),
    (lambda f: f(torch.randn(4, 8), torch.randn(5, 8)), 'paired'),
    (lambda f: f(torch.full((4, 8), float('nan')), torch.randn(4, 8)), 'image_feats contains NaN'),
    (lambda f: f(torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)), 'image_plan_feats must have one row'),
    (lambda f: f(torch.randn(8), torch.randn(8)), 'image_feats must be a 2-D tensor'),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call(CodebookOTLoss(num_codewords=5, embed_dim=8))


def test_bad_construction():
    with pytest.raises(ValueError, match='unknown keys'):
        CodebookOTLoss(num_codewords=5, embed_dim=8, term_weights=dict(i2t=1))
    with pytest.raises(ValueError, match='epsilon and temperature'):
        CodebookOTLoss(num_codewords=5, embed_dim=8, epsilon=0)
    with pytest.raises(TypeError, match='codebook must be'):
        CodebookOTLoss(codebook=torch.nn.Linear(2, 2))


@pytest.mark.parametrize('with_teacher', [False, True])
def test_plan_side_ot_cost_moves_only_the_codebook(with_teacher):
    # The default: L_ot is the cost of the plans' own features, so the student features get no
    # gradient from loss_ot_* and the codebook does; the student form pulls the students too.
    for ot_cost_features, students_move in (('plan', False), ('student', True)):
        loss_fn = CodebookOTLoss(num_codewords=10, embed_dim=8, ot_cost_features=ot_cost_features)
        zv, zt = _feats(0, 16, 8, True), _feats(1, 16, 8, True)
        tv, tt = (_feats(2, 16, 8), _feats(3, 16, 8)) if with_teacher else (None, None)
        out = loss_fn(zv, zt, tv, tt)
        (out['loss_ot_v'] + out['loss_ot_t']).backward()
        moved = zv.grad is not None and zv.grad.abs().sum().item() > 0
        assert moved == students_move, ot_cost_features
        assert (zt.grad is not None and zt.grad.abs().sum().item() > 0) == students_move
        assert loss_fn.codebook.weight.grad.abs().sum() > 0


def test_default_is_plan_side_ot_cost_and_off_drops_the_terms():
    assert CodebookOTLoss(num_codewords=4, embed_dim=3).ot_cost_features == 'plan'
    off = CodebookOTLoss(num_codewords=4, embed_dim=3, ot_cost_features='off')
    assert sorted(off(_feats(0, 6, 3), _feats(1, 6, 3))) == ['loss_i2p', 'loss_t2p']
    with pytest.raises(ValueError, match="ot_cost_features must be one of .*'plan'.*got 'teacher'"):
        CodebookOTLoss(num_codewords=4, embed_dim=3, ot_cost_features='teacher')


def _adamw_angular_steps(codebook, steps=20, lr=1e-3, seed=0):
    """Per-step angle (radians) every codeword turns under AdamW(lr, wd 0.02) with random gradients."""
    opt = torch.optim.AdamW(codebook.parameters(), lr=lr, weight_decay=0.02)
    g = torch.Generator().manual_seed(seed)
    angles = []
    for _ in range(steps):
        before = codebook().detach()
        opt.zero_grad()
        (codebook() * torch.randn(codebook.weight.shape, generator=g)).sum().backward()
        opt.step()
        cos = (before * codebook().detach()).sum(1).clamp(-1, 1)
        angles.append(torch.arccos(cos))
    return torch.stack(angles)                                   # (steps, K)


def test_codeword_angular_step_under_adamw_is_about_lr_by_default():
    # Documented bound (codebook.py): a codeword of norm r turns at most ~lr*sqrt(d)/r per Adam
    # step; the default N(0, 1) init has r ~ sqrt(d), i.e. about lr radians per step.
    lr, K, d = 1e-3, 128, 256
    torch.manual_seed(0)
    default = Codebook(num_codewords=K, embed_dim=d)
    norms = default.weight.detach().norm(dim=1)
    assert norms.min() > 0.8 * d ** 0.5 and norms.max() < 1.2 * d ** 0.5
    steps = _adamw_angular_steps(default, lr=lr)
    assert steps.max() <= 1.3 * lr            # sqrt(d)/min norm <= 1.25, plus Adam's epsilon slack
    torch.manual_seed(0)
    unit = _adamw_angular_steps(Codebook(num_codewords=K, embed_dim=d, init_norm=1.0), lr=lr)
    # Unit-norm codewords turn about sqrt(d) = 16 times faster: the choice is not cosmetic.
    assert unit.mean() > 8 * steps.mean()
    assert unit.max() <= 1.05 * lr * d ** 0.5


def test_codebook_init_norm_is_checked_and_applied():
    assert torch.allclose(Codebook(5, 7, init_norm=3.0).weight.norm(dim=1), torch.full((5,), 3.0))
    for bad in (0.0, -1.0, float('nan'), 'big'):
        with pytest.raises(ValueError, match='init_norm'):
            Codebook(5, 7, init_norm=bad)
    loss_fn = CodebookOTLoss(num_codewords=5, embed_dim=7, codeword_init_norm=2.0)
    assert torch.allclose(loss_fn.codebook.weight.norm(dim=1), torch.full((5,), 2.0))


def test_plan_queue_rows_join_the_solve_and_only_the_batch_becomes_targets():
    """With a plan queue the batch's targets are its rows of the plan of [batch; queue] (POT
    reference), the queue then holds the batch's plan features, and eval mode leaves it alone."""
    B, K, D, eps = 6, 24, 8, 0.1
    torch.manual_seed(0)
    loss_fn = CodebookOTLoss(num_codewords=K, embed_dim=D, epsilon=eps, sinkhorn_tol=1e-7, sinkhorn_max_iters=20000,
                             plan_queue_size=30, ot_cost_features='off')
    first_v, first_t = _feats(1, 20, D), _feats(2, 20, D)
    loss_fn(first_v, first_t)                                       # student plans enqueued
    torch.testing.assert_close(loss_fn.plan_queues['image'].features(), first_v)
    zv, zt, tv, tt = _feats(3, B, D, True), _feats(4, B, D, True), _feats(5, B, D), _feats(6, B, D)
    losses = loss_fn(zv, zt, tv, tt)
    codewords = F.normalize(loss_fn.codebook.weight.detach(), dim=1)
    q_v = _pot_assignments(torch.cat([tv, first_v]), codewords, eps)[:B]     # rows of the joint plan
    q_t = _pot_assignments(torch.cat([tt, first_t]), codewords, eps)[:B]
    logp_v = F.log_softmax(zv.detach() @ codewords.T / 0.1, dim=1).double()
    expected_i2p = -(q_t * logp_v).sum(1).mean()
    assert losses['loss_i2p'].item() == pytest.approx(expected_i2p.item(), rel=1e-4)
    logp_t = F.log_softmax(zt.detach() @ codewords.T / 0.1, dim=1).double()
    assert losses['loss_t2p'].item() == pytest.approx(-(q_v * logp_t).sum(1).mean().item(), rel=1e-4)
    without_queue = -(_pot_assignments(tt, codewords, eps) * logp_v).sum(1).mean()
    assert abs(without_queue.item() - expected_i2p.item()) > 1e-3          # the queue mattered
    torch.testing.assert_close(loss_fn.plan_queues['text'].features()[-B:], tt)  # plan features, not students
    loss_fn.eval()
    loss_fn(zv, zt, tv, tt)
    assert len(loss_fn.plan_queues['image']) == 26


def test_plan_queue_gives_small_batches_peaked_targets():
    """B = 16 rows and K = 256 codewords: alone, each row's plan must spread over >= K / B = 16
    codewords; with 512 queued rows the batch's plan rows are far more peaked."""
    B, K, D = 16, 256, 32
    feats = _feats(0, B + 512, D)
    spreads = {}
    for size in (0, 512):
        torch.manual_seed(0)
        loss_fn = CodebookOTLoss(num_codewords=K, embed_dim=D, plan_queue_size=size)
        if size:
            loss_fn(feats[B:], feats[B:])
        loss_fn(feats[:B], feats[:B])
        spreads[size] = loss_fn.last_stats['code_plan_perplexity'].item()
    assert spreads[0] >= B - 1e-3 and spreads[512] < 0.5 * spreads[0], spreads


def test_warmup_steps_zero_every_term_then_train_and_resume_counts():
    torch.manual_seed(0)
    loss_fn = CodebookOTLoss(num_codewords=16, embed_dim=8, warmup_steps=2)
    zv, zt = _feats(0, 6, 8, True), _feats(1, 6, 8, True)
    for step in range(2):
        losses = loss_fn(zv, zt)
        assert set(losses) == {'loss_i2p', 'loss_t2p', 'loss_ot_v', 'loss_ot_t'}
        assert all(v.item() == 0.0 for v in losses.values())
        sum(losses.values()).backward()
        # the codebook still gets a (zero) gradient, so DDP's reducer sees it every step
        assert loss_fn.codebook.weight.grad is not None and not loss_fn.codebook.weight.grad.any()
    loss_fn.eval()
    assert loss_fn(zv, zt)['loss_i2p'].item() > 0                  # eval mode: no warm-up, no count
    loss_fn.train()
    state = loss_fn.state_dict()
    assert int(state['num_steps']) == 2
    resumed = CodebookOTLoss(num_codewords=16, embed_dim=8, warmup_steps=2)
    resumed.load_state_dict(state)
    assert resumed(zv, zt)['loss_i2p'].item() > 0                   # the count survived the checkpoint
    # options off: the state dict keeps the keys of earlier versions (old checkpoints load)
    assert set(CodebookOTLoss(num_codewords=16, embed_dim=8).state_dict()) == {'codebook.weight', 'codebook.usage'}


@pytest.mark.parametrize('kwargs, match', [
    (dict(plan_queue_size=-1), 'plan_queue_size must be an integer >= 0, got -1'),
    (dict(plan_queue_size=2.5), 'plan_queue_size must be an integer >= 0, got 2.5'),
    (dict(warmup_steps=True), 'warmup_steps must be an integer >= 0, got True'),
])
def test_bad_remedy_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CodebookOTLoss(num_codewords=4, embed_dim=2, **kwargs)
