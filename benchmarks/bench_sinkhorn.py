"""Benchmark: vlp_codebook.ot.sinkhorn vs POT's ot.sinkhorn vs SwAV-style 3 iterations.

Usage::

    python benchmarks/bench_sinkhorn.py                 # full grid, both feature kinds
    python benchmarks/bench_sinkhorn.py --quick         # B=1024, K=4096 only
    python benchmarks/bench_sinkhorn.py --iterations    # iteration counts across the loss's range

For each (B, K) a cosine cost ``1 - z c^T`` between unit-norm features z (B x 256) and
codewords c (K x 256), ε = 0.05, is solved by

* ours: ``vlp_codebook.ot.sinkhorn`` (fp32, tol 1e-4 on the L1 marginal error);
* POT: ``ot.sinkhorn(a, b, M, 0.05, stopThr=1e-6)`` in float64 numpy (the cost matrix is
  handed over as a float64 array already, not timed);
* SwAV-style: 3 fixed row/column normalisations of ``exp(-M/ε)`` in fp32 (as SwAV's
  ``distributed_sinkhorn``; our own implementation for comparison).

Every method is timed on the same cost in one process: ``--repeats`` calls in a row, three
blocks per method taking turns, median of the 3 x ``--repeats`` times, so the ratios are side
by side under the same machine load. "ours" is the solver with its default ``check_every`` for
the device; ``--check-every N`` adds a column with that setting (the CPU default checks every
iteration). ``err`` is ``max(||T1 - a||_1, ||T^T 1 - b||_1)``. ``--device cuda`` runs ours and
SwAV-3 on the GPU and POT's torch backend (``ot.sinkhorn`` on CUDA tensors, float64) there too.

On a CPU shared with other jobs, run with ``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE``: torch's
OpenMP workers otherwise spin after every parallel pass and starve the solver's small vector
ops (measured: 8 ms for a 4096-element ``log``, POT / ours 0.6-0.8x instead of 4.2x).

Feature kinds: ``clustered`` draws each feature as a noisy copy of a random codeword (noise
0.08 per dimension, as a trained encoder's features concentrate near codewords); ``isotropic``
draws features uniformly on the sphere (costs all close to 1: an easy problem); ``peaked`` is
``clustered`` with noise 0.02 (each feature almost on its codeword: plans close to a
permutation, the hard case for plain Sinkhorn).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ot
import torch
from torch.nn import functional as F

from vlp_codebook.ot import sinkhorn


def make_cost(B: int, K: int, kind: str, dim: int = 256, seed: int = 0,
              device: str = 'cpu') -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codewords = F.normalize(torch.randn(K, dim, generator=g), dim=1)
    if kind == 'collapsed':   # every feature near one direction (an encoder that collapsed)
        centre = F.normalize(torch.randn(dim, generator=g), dim=0)
        return (1.0 - F.normalize(centre + 0.05 * torch.randn(B, dim, generator=g), dim=1) @ codewords.T).to(device)
    if kind in ('clustered', 'peaked'):
        noise = 0.08 if kind == 'clustered' else 0.02
        idx = torch.randint(0, K, (B,), generator=g)
        feats = F.normalize(codewords[idx] + noise * torch.randn(B, dim, generator=g), dim=1)
    else:
        feats = F.normalize(torch.randn(B, dim, generator=g), dim=1)
    return (1.0 - feats @ codewords.T).to(device)


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


def timed_blocks(fns, repeats, blocks=3, sync=lambda: None):
    """Median time of each function over ``blocks`` x ``repeats`` calls: ``repeats`` calls in a
    row (a training loop calls the solver on a cost it has just computed, so caches are warm),
    and the methods take turns block by block so that all of them see the same machine load.
    ``sync`` waits for the device (``torch.cuda.synchronize`` on a GPU)."""
    outs, times = {}, {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                outs[name] = fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    return outs, {name: statistics.median(t) for name, t in times.items()}


def run(kind, grid, eps, repeats, device='cpu', check_every=None):
    rows = []
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    for B, K in grid:
        cost = make_cost(B, K, kind, device=device)
        if device == 'cpu':
            cost_pot = cost.double().numpy()
            a, b = np.full(B, 1.0 / B), np.full(K, 1.0 / K)
        else:  # POT's torch backend on the same device
            cost_pot = cost.double()
            a = torch.full((B,), 1.0 / B, dtype=torch.float64, device=device)
            b = torch.full((K,), 1.0 / K, dtype=torch.float64, device=device)
        sinkhorn(cost, eps)  # warm-up
        fns = {
            'ours': lambda: sinkhorn(cost, eps, tol=1e-4, return_info=True),
            'pot': lambda: ot.sinkhorn(a, b, cost_pot, eps, stopThr=1e-6, numItermax=100000, log=True),
            'swav': lambda: swav_style(cost, eps),
        }
        if check_every is not None:
            fns['ours_ce'] = lambda: sinkhorn(cost, eps, tol=1e-4, check_every=check_every,
                                              return_info=True)
        outs, t = timed_blocks(fns, repeats, sync=sync)
        (plan, info), (plan_pot, log), plan_swav = outs['ours'], outs['pot'], outs['swav']
        plan, plan_pot, plan_swav = (torch.as_tensor(p).cpu() for p in (plan, plan_pot, plan_swav))
        a_cpu, b_cpu = np.full(B, 1.0 / B), np.full(K, 1.0 / K)
        row = dict(kind=kind, B=B, K=K, ours_ms=t['ours'] * 1e3, ours_it=info.iterations,
                   ours_reads=info.host_reads, ours_err=marginal_error(plan, a_cpu, b_cpu),
                   pot_ms=t['pot'] * 1e3, pot_it=int(log['niter']),
                   pot_err=marginal_error(plan_pot, a_cpu, b_cpu),
                   swav_ms=t['swav'] * 1e3, swav_err=marginal_error(plan_swav, a_cpu, b_cpu),
                   max_diff=float((plan.double() - plan_pot.double()).abs().max() * B),
                   speedup=t['pot'] / t['ours'])
        if check_every is not None:
            row['ce_ms'] = t['ours_ce'] * 1e3
            row['ce_it'] = outs['ours_ce'][1].iterations
        rows.append(row)
    return rows


def per_iteration(grid, eps, device, peak_gbps=None, repeats=5):
    """Time of one Sinkhorn iteration, as the slope between solves of 10 and 40 iterations
    (tol 1e-12, never met), and the bandwidth it reaches: an iteration reads the fp32 kernel
    twice (``K v`` and ``Kᵀu``), 8·B·K bytes; the vectors are negligible."""
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    print('| B | K | ms / iteration | GB/s | % of peak |')
    print('|---|---|---|---|---|')
    for B, K in grid:
        cost = make_cost(B, K, 'clustered', device=device)
        solve = {n: (lambda n=n: sinkhorn(cost, eps, tol=1e-12, max_iters=n, check_every=n,
                                          warn_not_converged=False)) for n in (10, 40)}
        _, t = timed_blocks(solve, repeats, sync=sync)
        per_it = (t[40] - t[10]) / 30
        gbps = 8.0 * B * K / per_it / 1e9
        peak = f'{100 * gbps / peak_gbps:.0f} %' if peak_gbps else 'n/a'
        print(f'| {B} | {K} | {per_it * 1e3:.3f} | {gbps:.0f} | {peak} |', flush=True)


def iteration_table(kinds, grid):
    """Iterations to tol 1e-4 across the codebook loss's range (ε 0.02-0.1, fp32 and bf16
    costs), plain Sinkhorn-Knopp (``anderson=0``) next to the default; ``!``: not converged
    in 1000 iterations."""
    print('| features | B x K | ε 0.02 plain / default | ε 0.05 | ε 0.1 | bf16 = fp32 |')
    print('|---|---|---|---|---|---|')
    for kind, (B, K) in ((kind, size) for size in grid for kind in kinds):
        cost, cells, same = make_cost(B, K, kind), [], True
        for eps in (0.02, 0.05, 0.1):
            counts = []
            for anderson in (0, 3):
                infos = [sinkhorn(cost.to(dtype), eps, tol=1e-4, anderson=anderson, return_info=True,
                                  warn_not_converged=False)[1] for dtype in (torch.float32, torch.bfloat16)]
                counts.append(f'{infos[0].iterations}{"" if infos[0].converged else "!"}')
                same = same and abs(infos[0].iterations - infos[1].iterations) <= 1
            cells.append(' / '.join(counts))
        print(f'| {kind} | {B} x {K} | ' + ' | '.join(cells) + f' | {"yes" if same else "no"} |', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='only B=1024, K=4096')
    parser.add_argument('--grid', nargs='+', default=None, metavar='BxK',
                        help='sizes to run, e.g. 1024x4096 4096x16384 (overrides --quick)')
    parser.add_argument('--kinds', nargs='+', default=['clustered', 'isotropic', 'peaked'])
    parser.add_argument('--epsilon', type=float, default=0.05)
    parser.add_argument('--repeats', type=int, default=5, help='calls in a row per block (3 blocks)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s)')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    parser.add_argument('--check-every', type=int, default=None,
                        help='also time ours with this check_every')
    parser.add_argument('--per-iteration', action='store_true',
                        help='also print the time and memory bandwidth of one iteration')
    parser.add_argument('--peak-gbps', type=float, default=None,
                        help='the device\'s peak memory bandwidth, for --per-iteration (H200: 4800)')
    parser.add_argument('--iterations', action='store_true',
                        help='only the table of iteration counts across the loss\'s range')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.grid:
        grid = [tuple(int(x) for x in size.lower().split('x')) for size in args.grid]
    else:
        grid = [(1024, 4096)] if args.quick else [(B, K) for B in (256, 1024, 4096) for K in (1024, 4096)]
    if args.iterations:
        kinds = args.kinds + ['collapsed']
        return iteration_table(kinds, grid if args.grid else [(32, 64), (256, 1024), (1024, 1024),
                                                              (4096, 1024), (4096, 4096), (4096, 16384)])
    where = (torch.cuda.get_device_name() if args.device.startswith('cuda')
             else f'{torch.get_num_threads()} threads')
    print(f'torch {torch.__version__}, {where}, POT {ot.__version__}, epsilon={args.epsilon}, '
          f'median of 3 x {args.repeats} calls')
    ce = args.check_every
    header = ('| features | B | K | ours ms | ours iters | host reads | ours err | POT ms | POT iters '
              '| POT err | SwAV-3 ms | SwAV-3 err | max ΔT·B | POT / ours |'
              + (f' ours check_every={ce} ms | iters |' if ce is not None else ''))
    print(header)
    print('|' + '---|' * (header.count('|') - 1))
    for kind in args.kinds:
        for r in run(kind, grid, args.epsilon, args.repeats, args.device, ce):
            extra = f" {r['ce_ms']:.2f} | {r['ce_it']} |" if ce is not None else ''
            print(f"| {r['kind']} | {r['B']} | {r['K']} | {r['ours_ms']:.2f} | {r['ours_it']} | "
                  f"{r['ours_reads']} | {r['ours_err']:.1e} | {r['pot_ms']:.1f} | {r['pot_it']} | "
                  f"{r['pot_err']:.1e} | {r['swav_ms']:.2f} | {r['swav_err']:.1e} | "
                  f"{r['max_diff']:.1e} | {r['speedup']:.1f}x |{extra}", flush=True)
    if args.per_iteration:
        per_iteration(grid, args.epsilon, args.device, args.peak_gbps, args.repeats)


if __name__ == '__main__':
    main()
