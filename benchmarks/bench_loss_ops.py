"""Benchmark: dispatched ops and time of the losses (forward + backward) against their anchors.

Usage::

    python benchmarks/bench_loss_ops.py --threads 1            # CPU, the table of docs/benchmarks.md
    python benchmarks/bench_loss_ops.py --device cuda          # on a GPU (benchmarks/gpu_check.sh)

Each piece runs forward + backward on the same inputs; ops are counted with
:class:`vlp_codebook.profiling.OpCounter` (every dispatched ``aten`` operator: a kernel launch on
a GPU), host reads with a patch of the Tensor methods that read values. Time: ``--repeats``
calls in a row, three blocks per piece taking turns, median; the ratios are side by side
under the same machine load.

* ``CodebookOTLoss`` (teacher plans, K codewords, d 256) against **SwAV's form**: ``exp(-M/ε)``,
  row/column normalisations, swapped cross-entropy (our own implementation of the loss in
  SwAV's ``main_swav.py``), once with SwAV's 3 iterations and once iterated to the same ``tol``
  (1e-4 L1 marginal error, checked every iteration as our CPU default does);
* ``MultiDirectionalDistillationLoss`` (4 directions, queues of 1024 with ids, image ids)
  against **ALBEF-style ITC**: i2t and t2i against ``[teacher batch; queue]`` with momentum
  soft targets (alpha 0.4), image ids as positives (our implementation of ALBEF's loss).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.nn import functional as F

from vlp_codebook.models.losses.codebook_ot_loss import CodebookOTLoss
from vlp_codebook.models.losses.distillation import MultiDirectionalDistillationLoss
from vlp_codebook.models.teachers import FeatureQueue
from vlp_codebook.profiling import OpCounter

READS = ('item', 'tolist', '__bool__', 'cpu', 'numpy', '__float__', '__int__', '__index__')


class HostReads:
    def __enter__(self):
        self.count = 0
        self.originals = {name: getattr(torch.Tensor, name) for name in READS}
        for name, original in self.originals.items():
            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


def swav_loss(zv, zt, codebook_weight, tv, tt, eps=0.05, temperature=0.1, iters=3, tol=None):
    """SwAV's swapped prediction across the two modalities with its Sinkhorn-Knopp; ``tol``:
    iterate until the column marginal error is below it (one host read per iteration)."""
    c = F.normalize(codebook_weight, dim=1)
    zv, zt = F.normalize(zv, dim=1), F.normalize(zt, dim=1)

    @torch.no_grad()
    def assign(feats):
        q = torch.exp(F.normalize(feats, dim=1) @ c.T / eps).T      # (K, B), SwAV's layout
        q /= q.sum()
        K, B = q.shape
        n = 0
        while True:
            q /= q.sum(dim=1, keepdim=True)
            q /= K
            q /= q.sum(dim=0, keepdim=True)
            q /= B
            n += 1
            if tol is None:
                if n >= iters:
                    break
            elif (q.sum(dim=1) - 1.0 / K).abs().sum().item() <= tol or n >= 1000:
                break
        return (q * B).T

    qv, qt = assign(tv), assign(tt)
    pv = F.log_softmax(zv @ c.T / temperature, dim=1)
    pt = F.log_softmax(zt @ c.T / temperature, dim=1)
    return -(qt * pv).sum(1).mean() - (qv * pt).sum(1).mean()


def albef_itc(zv, zt, tv, tt, qv, qt, ids, qids_v, qids_t, temp, alpha=0.4):
    """ALBEF's ITC with momentum distillation (i2t, t2i), ids as positives."""
    zv, zt = F.normalize(zv, dim=1), F.normalize(zt, dim=1)
    with torch.no_grad():
        keys_v = torch.cat([F.normalize(tv, dim=1), qv])
        keys_t = torch.cat([F.normalize(tt, dim=1), qt])
        pos_v = (ids[:, None] == torch.cat([ids, qids_v])[None]).float()
        pos_t = (ids[:, None] == torch.cat([ids, qids_t])[None]).float()
        pos_v, pos_t = pos_v / pos_v.sum(1, keepdim=True), pos_t / pos_t.sum(1, keepdim=True)
        sim_i2t_m = F.normalize(tv, dim=1) @ keys_t.T / temp
        sim_t2i_m = F.normalize(tt, dim=1) @ keys_v.T / temp
        target_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * pos_t
        target_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * pos_v
    sim_i2t = zv @ keys_t.T / temp
    sim_t2i = zt @ keys_v.T / temp
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * target_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * target_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def measure(pieces, repeats, sync):
    counts = {}
    for name, fn in pieces.items():
        fn()
        with OpCounter() as ops, HostReads() as reads:
            fn()
        counts[name] = (ops.total, reads.count)
    times = {name: [] for name in pieces}
    for _ in range(3):
        for name, fn in pieces.items():
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    return {name: (counts[name][0], counts[name][1], statistics.median(ts) * 1e3) for name, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--shapes', nargs='+', default=['64x128', '256x1024'], metavar='BxK')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    d = 256
    print(f'device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; '
          'forward + backward; ms: median of 3 x repeats, pieces taking turns\n')
    print('| piece | B, K | ops | host reads | ms | anchor | anchor ops | anchor ms | ms ratio |')
    print('|---|---|---|---|---|---|---|---|---|')
    for shape in args.shapes:
        B, K = (int(x) for x in shape.split('x'))
        torch.manual_seed(0)
        loss_fn = CodebookOTLoss(num_codewords=K, embed_dim=d).train().to(device)
        zv = torch.randn(B, d, device=device, requires_grad=True)
        zt = torch.randn(B, d, device=device, requires_grad=True)
        tv, tt = zv.detach() + 0.1 * torch.randn_like(zv), zt.detach() + 0.1 * torch.randn_like(zt)
        pieces = {
            'ours': lambda: sum(loss_fn(zv, zt, tv, tt).values()).backward(),
            'swav3': lambda: swav_loss(zv, zt, loss_fn.codebook.weight, tv, tt).backward(),
            'swav_tol': lambda: swav_loss(zv, zt, loss_fn.codebook.weight, tv, tt, tol=1e-4).backward(),
        }
        r = measure(pieces, args.repeats, sync)
        iters = loss_fn.last_stats['sinkhorn_iters_image'] + loss_fn.last_stats['sinkhorn_iters_text']
        for anchor, label in (('swav_tol', "SwAV's form to tol 1e-4"), ('swav3', "SwAV's form, 3 iterations")):
            print(f"| CodebookOTLoss ({iters:.0f} Sinkhorn iterations, both solves) | {B}, {K} | {r['ours'][0]} | "
                  f"{r['ours'][1]} | {r['ours'][2]:.2f} | {label} | {r[anchor][0]} | {r[anchor][2]:.2f} | "
                  f"**{r['ours'][2] / r[anchor][2]:.2f}** |")
    B, N = 64, 1024
    torch.manual_seed(0)
    loss_fn = MultiDirectionalDistillationLoss().to(device)
    queues = [FeatureQueue(N, d, with_ids=True).to(device) for _ in range(2)]
    for queue in queues:
        queue.enqueue(F.normalize(torch.randn(N, d, device=device), dim=1),
                      ids=torch.randint(0, 5000, (N,), device=device))
    zv = torch.randn(B, d, device=device, requires_grad=True)
    zt = torch.randn(B, d, device=device, requires_grad=True)
    tv, tt = zv.detach() + 0.1 * torch.randn_like(zv), zt.detach() + 0.1 * torch.randn_like(zt)
    ids = torch.randint(0, 5000, (B,), device=device)
    qv, qids_v = queues[0].get()
    qt, qids_t = queues[1].get()
    pieces = {
        'ours': lambda: sum(loss_fn(image_feats=zv, text_feats=zt, image_teacher_feats=tv, text_teacher_feats=tt,
                                    image_queue=queues[0], text_queue=queues[1], image_ids=ids,
                                    alpha=0.4).values()).backward(),
        'albef': lambda: albef_itc(zv, zt, tv, tt, qv, qt, ids, qids_v, qids_t, loss_fn.temperature).backward(),
    }
    r = measure(pieces, args.repeats, sync)
    print(f"| MultiDirectionalDistillationLoss (4 directions) | {B}, queue {N} | {r['ours'][0]} | {r['ours'][1]} | "
          f"{r['ours'][2]:.2f} | ALBEF-style ITC (2 directions) | {r['albef'][0]} | {r['albef'][2]:.2f} | "
          f"**{r['ours'][2] / r['albef'][2]:.2f}** |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
