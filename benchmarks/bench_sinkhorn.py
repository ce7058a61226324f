"""Benchmark: vlp_codebook.ot.sinkhorn vs POT's ot.sinkhorn vs SwAV-style 3 iterations.

Usage::

    python benchmarks/bench_sinkhorn.py                 # full grid, both feature kinds
    python benchmarks/bench_sinkhorn.py --quick         # B=1024, K=4096 only

For each (B, K) a cosine cost ``1 - z c^T`` between unit-norm features z (B x 256) and
codewords c (K x 256), ε = 0.05, is solved by

* ours: ``vlp_codebook.ot.sinkhorn`` (fp32, tol 1e-4 on the L1 marginal error);
* POT: ``ot.sinkhorn(a, b, M, 0.05, stopThr=1e-6)`` in float64 numpy (the cost matrix is
  handed over as a float64 array already, not timed);
* SwAV-style: 3 fixed row/column normalisations of ``exp(-M/ε)`` in fp32 (as SwAV's
  ``distributed_sinkhorn``; our own implementation for comparison).

Every method is timed on the same cost in one process: ``--repeats`` calls in a row, three
blocks per method taking turns, median of the 3 x ``--repeats`` times, so the ratios are side
by side under the same machine load. "ours" uses the fused CPU passes of
``vlp_codebook._native`` where they can be built (the column says so otherwise); "torch path"
is the same solver with them switched off. ``err`` is ``max(||T1 - a||_1, ||T^T 1 - b||_1)``.

Feature kinds: ``clustered`` draws each feature as a noisy copy of a random codeword (noise
0.08 per dimension, as a trained encoder's features concentrate near codewords); ``isotropic``
draws features uniformly on the sphere (costs all close to 1: an easy problem).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ot
import torch
from torch.nn import functional as F

from vlp_codebook import ot as vlp_ot
from vlp_codebook.ot import sinkhorn


def make_cost(B: int, K: int, kind: str, dim: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codewords = F.normalize(torch.randn(K, dim, generator=g), dim=1)
    if kind == 'clustered':
        idx = torch.randint(0, K, (B,), generator=g)
        feats = F.normalize(codewords[idx] + 0.08 * torch.randn(B, dim, generator=g), dim=1)
    else:
        feats = F.normalize(torch.randn(B, dim, generator=g), dim=1)
    return 1.0 - feats @ codewords.T


def marginal_error(plan, a, b) -> float:
    plan = torch.as_tensor(plan, dtype=torch.float64)
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return max((plan.sum(1) - a).abs().sum().item(), (plan.sum(0) - b).abs().sum().item())


def swav_style(cost: torch.Tensor, eps: float, iters: int = 3) -> torch.Tensor:
    """Fixed-iteration Sinkhorn as in SwAV: exp, then alternate column/row normalisation."""
    B, K = cost.shape
    q = torch.exp(-(cost - cost.min()) / eps)
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=0, keepdim=True)
        q /= K
        q /= q.sum(dim=1, keepdim=True)
        q /= B
    return q


def timed_blocks(fns, repeats, blocks=3):
    """Median time of each function over ``blocks`` x ``repeats`` calls: ``repeats`` calls in a
    row (a training loop calls the solver on a cost it has just computed, so caches are warm),
    and the methods take turns block by block so that all of them see the same machine load."""
    outs, times = {}, {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                outs[name] = fn()
                times[name].append(time.perf_counter() - t0)
    return outs, {name: statistics.median(t) for name, t in times.items()}


def ours_torch_path(cost, eps):
    """Our solver with the fused CPU passes switched off (the path GPUs and small problems take)."""
    vlp_ot._NATIVE_ENABLED = False
    try:
        return sinkhorn(cost, eps, tol=1e-4, return_info=True)
    finally:
        vlp_ot._NATIVE_ENABLED = True


def run(kind, grid, eps, repeats):
    rows = []
    for B, K in grid:
        cost = make_cost(B, K, kind)
        cost64 = cost.double().numpy()
        a, b = np.full(B, 1.0 / B), np.full(K, 1.0 / K)
        sinkhorn(cost, eps)  # warm-up (and the one-off build of the fused CPU passes)
        outs, t = timed_blocks({
            'ours': lambda: sinkhorn(cost, eps, tol=1e-4, return_info=True),
            'ours_torch': lambda: ours_torch_path(cost, eps),
            'pot': lambda: ot.sinkhorn(a, b, cost64, eps, stopThr=1e-6, numItermax=100000, log=True),
            'swav': lambda: swav_style(cost, eps),
        }, repeats)
        (plan, info), (plan_pot, log), plan_swav = outs['ours'], outs['pot'], outs['swav']
        rows.append(dict(kind=kind, B=B, K=K, ours_ms=t['ours'] * 1e3, ours_it=info.iterations,
                         backend=info.backend, ours_err=marginal_error(plan, a, b),
                         torch_ms=t['ours_torch'] * 1e3, pot_ms=t['pot'] * 1e3,
                         pot_it=int(log['niter']), pot_err=marginal_error(plan_pot, a, b),
                         swav_ms=t['swav'] * 1e3, swav_err=marginal_error(plan_swav, a, b),
                         max_diff=float(np.abs(plan.double().numpy() - plan_pot).max() * B),
                         speedup=t['pot'] / t['ours'], speedup_torch=t['pot'] / t['ours_torch']))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='only B=1024, K=4096')
    parser.add_argument('--kinds', nargs='+', default=['clustered', 'isotropic'])
    parser.add_argument('--epsilon', type=float, default=0.05)
    parser.add_argument('--repeats', type=int, default=5, help='calls in a row per block (3 blocks)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = [(1024, 4096)] if args.quick else [(B, K) for B in (256, 1024, 4096) for K in (1024, 4096)]
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, POT {ot.__version__}, '
          f'epsilon={args.epsilon}, median of 3 x {args.repeats} calls')
    header = ('| features | B | K | ours ms | ours iters | ours err | ours, torch path ms | POT ms '
              '| POT iters | POT err | SwAV-3 ms | SwAV-3 err | max ΔT·B | POT / ours | POT / torch path |')
    print(header)
    print('|' + '---|' * (header.count('|') - 1))
    for kind in args.kinds:
        for r in run(kind, grid, args.epsilon, args.repeats):
            ours = f"{r['ours_ms']:.1f}" + ('' if r['backend'] == 'cpu-fused' else f" ({r['backend']})")
            print(f"| {r['kind']} | {r['B']} | {r['K']} | {ours} | {r['ours_it']} | "
                  f"{r['ours_err']:.1e} | {r['torch_ms']:.1f} | {r['pot_ms']:.1f} | {r['pot_it']} | "
                  f"{r['pot_err']:.1e} | {r['swav_ms']:.1f} | {r['swav_err']:.1e} | "
                  f"{r['max_diff']:.1e} | {r['speedup']:.1f}x | {r['speedup_torch']:.1f}x |", flush=True)


if __name__ == '__main__':
    main()
