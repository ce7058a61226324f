"""The hot path compiles to single graphs: ``torch.compile(fullgraph=True)`` under the
``aot_eager`` backend (no C++ compiler needed; on a GPU the same graphs go to inductor or CUDA
graphs, docs/ot_and_codebook.md). ``fullgraph=True`` raises on any graph break, so these tests
fail if a host read or a data-dependent Python branch creeps into the compiled pieces."""
import pytest
import torch
from torch.nn import functional as F

from vlp_codebook.models.losses.codebook_ot_loss import CodebookOTLoss
from vlp_codebook.models.losses.distillation import MultiDirectionalDistillationLoss
from vlp_codebook.models.teachers import FeatureQueue
from vlp_codebook.anderson import AndersonMixer as _AndersonMixer
from vlp_codebook.ot import plain_iteration


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(fn):
    return torch.compile(fn, fullgraph=True, backend='aot_eager')


def test_a_block_of_sinkhorn_iterations_compiles_to_one_graph():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    c = F.normalize(torch.randn(48, 32, generator=g), dim=1)
    kernel = torch.softmax(-(1 - z @ c.T) / 0.05, dim=1)
    a, b = torch.full((64,), 1 / 64), torch.full((48,), 1 / 48)

    def block(kernel, a, b, col):
        kernel_t = kernel.t()
        for _ in range(4):
            u, v, Kv, col = plain_iteration(kernel, kernel_t, a, b, col)
        return u, v, torch.dist(v * col, b, 1)

    col = kernel.T @ a
    expected = block(kernel, a, b, col)
    got = _compile(block)(kernel, a, b, col)
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y)
    assert expected[2] < torch.dist(col, b, 1)      # the iterations did something


def test_an_anderson_step_compiles_to_one_graph():
    eager, compiled = _AndersonMixer(3), _AndersonMixer(3)
    step = _compile(lambda x, gx, err: compiled.step(x, gx, err))
    x_eager = x_compiled = torch.zeros(50, dtype=torch.float64)
    for k in range(3):
        err = torch.tensor(1.0 / (k + 1), dtype=torch.float64)
        x_eager = eager.step(x_eager, 0.5 * x_eager + torch.linspace(0, 1, 50, dtype=torch.float64), err)
        x_compiled = step(x_compiled, 0.5 * x_compiled + torch.linspace(0, 1, 50, dtype=torch.float64), err)
        torch.testing.assert_close(x_compiled, x_eager)


def _grads(out, params):
    return torch.autograd.grad(sum(out.values()), params)


def test_codebook_loss_forward_and_backward_compile_to_one_graph():
    torch.manual_seed(0)
    loss_fn = CodebookOTLoss(num_codewords=32, embed_dim=24).train()
    zv, zt = torch.randn(16, 24, requires_grad=True), torch.randn(16, 24, requires_grad=True)
    tv, tt = torch.randn(16, 24), torch.randn(16, 24)
    params = [zv, zt, loss_fn.codebook.weight]
    expected = loss_fn(zv, zt, tv, tt)
    expected_grads = _grads(expected, params)
    got = _compile(lambda *args: loss_fn(*args))(zv, zt, tv, tt)    # the solver: one opaque operator
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    for x, y in zip(_grads(got, params), expected_grads):
        torch.testing.assert_close(x, y)
    assert float(loss_fn.last_stats['sinkhorn_iters_image']) >= 1


def test_distillation_loss_forward_and_backward_compile_to_one_graph():
    torch.manual_seed(0)
    loss_fn = MultiDirectionalDistillationLoss()
    queues = [FeatureQueue(64, 24, with_ids=True) for _ in range(2)]
    for queue in queues:
        queue.enqueue(torch.randn(64, 24), ids=torch.randint(0, 50, (64,)))
    zv, zt = torch.randn(16, 24, requires_grad=True), torch.randn(16, 24, requires_grad=True)
    tv, tt, ids = torch.randn(16, 24), torch.randn(16, 24), torch.randint(0, 50, (16,))

    def losses(zv, zt, tv, tt):
        return loss_fn(image_feats=zv, text_feats=zt, image_teacher_feats=tv, text_teacher_feats=tt,
                       image_queue=queues[0], text_queue=queues[1], image_ids=ids, alpha=0.4)

    params = [zv, zt, loss_fn.temperature]
    expected = losses(zv, zt, tv, tt)
    expected_grads = _grads(expected, params)
    got = _compile(losses)(zv, zt, tv, tt)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    for x, y in zip(_grads(got, params), expected_grads):
        torch.testing.assert_close(x, y)
