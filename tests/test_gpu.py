"""GPU checks (``pytest -m gpu``): the solver against POT's torch backend on CUDA, a block of
solver iterations without a synchronising CUDA call, the losses on CUDA against the CPU, and a
CODIS bf16-autocast training step (one process, no DDP). Every test skips with the reason on a
machine without CUDA; ``benchmarks/gpu_check.sh`` runs them and the GPU benchmarks in one go."""
import math
import pathlib
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.nn.functional import normalize

sys.path.insert(0, str(pathlib.Path(__file__).parent))

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason='needs a CUDA device (torch.cuda.is_available() is False)')]


def _clustered_cost(B, K):
    from test_ot_sinkhorn import _clustered_cost as clustered_cost
    return clustered_cost(B, K, dim=64).cuda()


@pytest.mark.parametrize('eps', [0.05, 0.01])
def test_sinkhorn_on_cuda_agrees_with_pot_torch_backend(eps):
    import ot

    from vlp_codebook.ot import default_check_every, sinkhorn
    cost = _clustered_cost(512, 2048)
    plan, info = sinkhorn(cost, eps, tol=1e-5, return_info=True)
    assert plan.device.type == 'cuda' and plan.dtype == torch.float32
    assert info.converged
    assert info.host_reads == math.ceil(info.iterations / default_check_every(cost.device))
    B, K = cost.shape
    a = torch.full((B,), 1.0 / B, dtype=torch.float64, device='cuda')
    b = torch.full((K,), 1.0 / K, dtype=torch.float64, device='cuda')
    ref = ot.sinkhorn(a, b, cost.double(), eps, stopThr=1e-9, numItermax=100000, method='sinkhorn_log')
    assert ref.device.type == 'cuda'
    assert (plan.double() - ref).abs().sum().item() < 1e-4
    # and the same plan as on the CPU
    plan_cpu = sinkhorn(cost.cpu(), eps, tol=1e-5)
    assert (plan.cpu() - plan_cpu).abs().sum().item() < 1e-4


def test_a_block_of_iterations_has_no_synchronising_call():
    from vlp_codebook.ot import _Solver
    solver = _Solver(_clustered_cost(256, 1024).float(), 0.05, 3, None)
    solver._iterate()
    solver._start_anderson()
    solver._iterate()  # the first mixed step allocates the Anderson history
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for _ in range(8):
            solver._iterate()
        state = solver._state(first=True)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert all(v.device.type == 'cuda' for v in state.values())


def test_sinkhorn_under_bf16_autocast_and_tiny_epsilon_on_cuda():
    from vlp_codebook.ot import sinkhorn
    cost = _clustered_cost(128, 256).bfloat16()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        for eps in (1e-3, 0.05, 1.0):
            plan, info = sinkhorn(cost, eps, tol=1e-4, max_iters=50000, return_info=True)
            assert plan.dtype == torch.float32 and torch.isfinite(plan).all() and info.converged


def _unit(n, d, g, device):
    return normalize(torch.randn(n, d, generator=g), dim=1).to(device)


def test_losses_on_cuda_match_the_cpu(monkeypatch):
    from vlp_codebook import ot as vlp_ot
    from vlp_codebook.registry import MODELS
    # The same stopping iteration on both devices (the CUDA default checks every 4), so that
    # the plans differ by rounding only.
    monkeypatch.setitem(vlp_ot.CHECK_EVERY, 'cuda', 1)
    g = torch.Generator().manual_seed(0)
    feats = {k: _unit(16, 32, g, 'cpu') for k in ('zv', 'zt', 'zv_m', 'zt_m', 'qv', 'qt')}
    results = {}
    for device in ('cpu', 'cuda'):
        torch.manual_seed(0)
        distill = MODELS.build(dict(type='MultiDirectionalDistillationLoss')).to(device)
        code = MODELS.build(dict(type='CodebookOTLoss', num_codewords=64, embed_dim=32)).to(device)
        f = {k: v.to(device).requires_grad_(k in ('zv', 'zt')) for k, v in feats.items()}
        losses = distill(image_feats=f['zv'], text_feats=f['zt'], image_teacher_feats=f['zv_m'],
                         text_teacher_feats=f['zt_m'], image_queue=f['qv'], text_queue=f['qt'], alpha=0.4)
        losses.update({'code_' + k: v for k, v in code(f['zv'], f['zt'], f['zv_m'], f['zt_m']).items()})
        sum(losses.values()).backward()
        results[device] = ({k: v.detach().cpu() for k, v in losses.items()}, f['zv'].grad.cpu())
    for name, value in results['cpu'][0].items():
        torch.testing.assert_close(results['cuda'][0][name], value, rtol=1e-3, atol=1e-4, msg=name)
    torch.testing.assert_close(results['cuda'][1], results['cpu'][1], rtol=1e-3, atol=1e-4)


def test_codis_bf16_autocast_training_step_on_cuda():
    from mmengine.optim import OptimWrapper
    from test_codis_model import ALL_TERMS, batch, tiny_model
    from test_host_reads import KNOWN_ELSEWHERE, HostReads

    model = tiny_model().cuda().train()
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-4))
    data = batch()
    reads = None
    for step in range(2):
        inputs = model.data_preprocessor(data, True)
        assert inputs['images'].device.type == 'cuda'
        with warnings.catch_warnings():
            warnings.simplefilter('error', RuntimeWarning)  # a non-converged plan would warn
            if step == 1:
                with HostReads(ignore=('torch/optim/',)) as reads, \
                        torch.autocast('cuda', dtype=torch.bfloat16):
                    losses = model(**inputs, mode='loss')
            else:
                with torch.autocast('cuda', dtype=torch.bfloat16):
                    losses = model(**inputs, mode='loss')
        assert ALL_TERMS <= set(losses)
        total = sum(v for k, v in losses.items() if k.startswith('loss'))
        assert torch.isfinite(total)
        optim.update_params(total)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    # Host reads of the loss computation: the solver's blocks, one for the value checks, and
    # the known reads left in files owned elsewhere.
    elsewhere = sum(reads.in_file(f) for f in KNOWN_ELSEWHERE)
    assert reads.in_file('checks.py') == 1, reads.sites
    assert reads.total - elsewhere - reads.in_file('ot.py') == 1, reads.sites
    stats = model.codebook_loss.last_stats
    assert reads.in_file('ot.py') <= sum(1 + stats[f'sinkhorn_iters_{m}'] / 4 for m in ('image', 'text'))


def test_pot_reference_is_float64_on_cuda():
    # the reference above really ran on the GPU in float64 (POT's torch backend)
    import ot
    M = torch.rand(4, 5, dtype=torch.float64, device='cuda')
    a, b = torch.full((4,), 0.25, dtype=torch.float64, device='cuda'), torch.full((5,), 0.2, dtype=torch.float64,
                                                                                    device='cuda')
    plan = ot.sinkhorn(a, b, M, 0.1)
    assert plan.device.type == 'cuda' and plan.dtype == torch.float64
    assert np.isclose(plan.sum().item(), 1.0)
