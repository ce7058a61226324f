"""Real-data ablation of the codebook term, with paired seeds (LiT-style, CPU-sized).

Does adding CODIS's codebook loss improve image-text alignment on real data? This benchmark
answers it the way a user of the toolkit would train: pretrained towers are **frozen** (LiT,
Zhai et al., CVPR 2022), their features computed once and cached, and small trainable 2-layer
heads are trained on top with the toolkit's registered components, built from ``MODELS`` exactly
as in a plain training loop:

* ``MultiDirectionalDistillationLoss`` (row a: t2i + i2t; row b: + i2i + t2t), with its learnable
  temperature, ALBEF's alpha ramp (``ramped_alpha``) and instance ids (captions of one image);
* one ``MomentumTeacher`` per head and one ``FeatureQueue`` per modality;
* row (c): in-batch InfoNCE with a learnable logit scale (init 1/0.07, capped at 100), no
  teacher, no queue, no soft targets: open_clip's ``ClipLoss`` in form;
* ``CodebookOTLoss`` on top of a row for the codebook rows (``*_cb*``); each codebook row is
  also compared with the row of the same objective without the codebook (the decomposition
  column: which factor removes the codebook's gain);
* AdamW over *all* parameters (heads, temperature, codebook) with one learning rate: the plain
  set-up the codebook's defaults must work for (rows ``*_cwd*`` give the codewords their own
  weight decay; the logit scale of row (c) is not decayed, as in open_clip).

Data and towers: ``emoji_data.py`` (the emoji image-caption set; train / val split by a stable
hash of the image path out of ``train.json``: choices are made on val; ``test.json``, 194 images /
698 captions, is reported and never used to choose; frozen EfficientNet-Lite0 and MiniLM-L6
features, cached on disk).

How a default is chosen (the rule the documented defaults follow): on **val** only, an
alternative replaces the current default when its paired difference to the default row has a
95 % interval above 0 on the main protocol (6 epochs, lr 1e-3, 10 seeds) and no other protocol
run (``--epochs 24``, ``--lr 3e-4``) puts it below the default with an interval below 0;
otherwise the default stays. Test is reported, never used to choose.

Paired seeds: for seed ``s`` every row starts from the same head weights (built first, from
``torch.manual_seed(s)``; the codebook is drawn after them) and sees the same batches in the
same order (a generator seeded with ``s``), so row differences are paired per seed. Per row the
table gives mean +- std over seeds of TR/IR R@1/5/10 and their mean (``r_mean``, the mean of
six), and the paired difference of ``r_mean`` to row (b): mean, 95 % t-interval, and the count of
seeds where the row is ahead.

Usage::

    python benchmarks/real_data_ablation.py              # 10 seeds, the default rows
    python benchmarks/real_data_ablation.py --rows decomposition --epochs 2   # a named group of rows
    python benchmarks/real_data_ablation.py --quick      # 3 seeds
    python benchmarks/real_data_ablation.py --smoke      # 1 seed, 4 epochs, 600 images, 64-px features (CI)
    python benchmarks/real_data_ablation.py --rows b b_cb128 --seeds 5 --json out.json

The table of the documented run is in docs/benchmarks.md and docs/ot_and_codebook.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import os.path as osp
import statistics
import sys
import time
from typing import Dict, Mapping, Tuple

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from ablation_rows import (BASELINE, DEFAULT_CODEBOOK_ROW, OBJECTIVE_BASELINE, OBJECTIVES,  # noqa: E402
                           ROW_GROUPS, ROWS, Row, result_path)
from emoji_data import cached_features, ensure_data, load_splits, tensors_for  # noqa: E402
from paired_stats import METRICS, mean_std, paired_difference  # noqa: E402

from vlp_codebook.evaluation.retrieval import retrieval_recalls  # noqa: E402
from vlp_codebook.models.losses.functional import ramped_alpha  # noqa: E402
from vlp_codebook.registry import MODELS  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# ---------------------------------------------------------------------------------- training
class Head(nn.Module):
    """The trainable 2-layer head on a frozen tower: Linear-GELU-Linear to the shared space."""

    def __init__(self, in_dim: int, hidden: int, embed_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class InBatchInfoNCE(nn.Module):
    """open_clip's ``ClipLoss`` in form: the symmetric cross-entropy of the in-batch similarities
    times a learnable logit scale (init 1/0.07, capped at 100); no teacher, queue or soft targets."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def temperature(self) -> torch.Tensor:
        return 1.0 / self.logit_scale.exp().clamp(max=100.0)

    def forward(self, zv: torch.Tensor, zt: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = (zv @ zt.T) / self.temperature
        target = torch.arange(zv.shape[0])
        return {'loss_itc': (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2}


def build_run(row: str, seed: int, in_dims: Tuple[int, int], args) -> dict:
    """The trainable pieces of one (row, seed), from the toolkit's registry.

    The heads are drawn first from ``torch.manual_seed(seed)``, so every row of one seed starts
    from the same head weights (the codebook, drawn after them, does not shift them)."""
    spec, d = ROWS[row], args.embed_dim
    torch.manual_seed(seed)
    image_head, text_head = Head(in_dims[0], args.hidden, d), Head(in_dims[1], args.hidden, d)
    teacher = dict(type='MomentumTeacher', momentum=args.momentum)
    queue = dict(type='FeatureQueue', size=args.queue, dim=d, with_ids=True)
    run = dict(image_head=image_head, text_head=text_head,
               image_teacher=MODELS.build(teacher, default_args=dict(student=image_head)),
               text_teacher=MODELS.build(teacher, default_args=dict(student=text_head)),
               image_queue=MODELS.build(queue), text_queue=MODELS.build(queue), code_loss=None)
    if spec.objective == 'clip':
        run['align_loss'] = InBatchInfoNCE()
    else:
        run['align_loss'] = MODELS.build(dict(type='MultiDirectionalDistillationLoss',
                                              directions=OBJECTIVES[spec.objective]))
    if spec.codebook is not None:
        run['code_loss'] = MODELS.build(dict(type='CodebookOTLoss', embed_dim=d, **spec.codebook))
    return run


def batch_order(seed: int, num_pairs: int, args):
    """The batches of every epoch (index tensors of ``args.batch`` pairs; the last partial batch
    is dropped so every step has the same shapes), from a generator seeded with ``seed`` only."""
    order = torch.Generator().manual_seed(seed)
    per_epoch = num_pairs // args.batch
    for _ in range(args.epochs):
        perm = torch.randperm(num_pairs, generator=order)
        yield [perm[i * args.batch:(i + 1) * args.batch] for i in range(per_epoch)]


def make_optimizer(run: dict, row: str, args) -> torch.optim.Optimizer:
    """AdamW, one learning rate for every parameter; weight decay ``--weight-decay`` except the
    codewords of a ``codeword_wd`` row and row (c)'s logit scale (not decayed, as in open_clip)."""
    spec = ROWS[row]
    codewords = list(run['code_loss'].parameters()) if run['code_loss'] is not None else []
    rest = [p for m in (run['image_head'], run['text_head']) for p in m.parameters()]
    no_decay = list(run['align_loss'].parameters()) if spec.objective == 'clip' else []
    rest += [] if no_decay else list(run['align_loss'].parameters())
    groups = [dict(params=rest, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0),
              dict(params=codewords, weight_decay=args.weight_decay if spec.codeword_wd is None else spec.codeword_wd)]
    return torch.optim.AdamW([g for g in groups if g['params']], lr=args.lr, foreach=True)


def step_losses(run: dict, spec: Row, x_img, x_txt, ids, alpha: float):
    """The losses of one batch and the teacher features to enqueue (None for row (c) without teacher plans)."""
    zv = F.normalize(run['image_head'](x_img), dim=1)
    zt = F.normalize(run['text_head'](x_txt), dim=1)
    code_loss = run['code_loss']
    zv_m = zt_m = None
    if spec.objective != 'clip' or (code_loss is not None and spec.teacher_plans):
        zv_m = F.normalize(run['image_teacher'](x_img), dim=1)
        zt_m = F.normalize(run['text_teacher'](x_txt), dim=1)
    if spec.objective == 'clip':
        losses = run['align_loss'](zv, zt)
    else:
        losses = run['align_loss'](image_feats=zv, text_feats=zt, image_teacher_feats=zv_m, text_teacher_feats=zt_m,
                                   image_queue=run['image_queue'], text_queue=run['text_queue'], image_ids=ids,
                                   alpha=alpha)
    if code_loss is not None:
        plans = (zv_m, zt_m) if spec.teacher_plans else (None, None)
        losses.update(code_loss(zv, zt, *plans))
    return losses, (zv_m, zt_m)


def train(run: dict, row: str, seed: int, data: dict, args) -> None:
    """AdamW with a cosine schedule, as a user's loop would."""
    spec = ROWS[row]
    optimizer = make_optimizer(run, row, args)
    n = data['train_images'].shape[0]
    per_epoch = n // args.batch
    total = per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    for epoch, batches in enumerate(batch_order(seed, n, args)):
        for it, idx in enumerate(batches):
            ids = data['train_ids'][idx]
            losses, (zv_m, zt_m) = step_losses(run, spec, data['train_images'][idx], data['train_texts'][idx], ids,
                                               ramped_alpha(args.alpha, it, per_epoch, epoch))
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            schedule.step()
            if zv_m is not None:
                run['image_teacher'].update()
                run['text_teacher'].update()
            if spec.objective != 'clip':
                run['image_queue'].enqueue(zv_m, ids)
                run['text_queue'].enqueue(zt_m, ids)


@torch.no_grad()
def evaluate(run: dict, data: dict, split: str) -> Dict[str, float]:
    """TR/IR recalls (percent) of the student heads on a retrieval split."""
    zv = F.normalize(run['image_head'](data[f'{split}_images']), dim=1)
    zt = F.normalize(run['text_head'](data[f'{split}_texts']), dim=1)
    txt2img = data[f'{split}_txt2img']
    img2txt = [[] for _ in range(zv.shape[0])]
    for t, i in enumerate(txt2img):
        img2txt[i].append(t)
    return retrieval_recalls(zv @ zt.T, img2txt, txt2img)


def train_and_evaluate(row: str, seed: int, data: dict, args) -> Dict[str, Dict[str, float]]:
    """Train one row with one seed; retrieval metrics on val and test, and end statistics."""
    run = build_run(row, seed, (data['train_images'].shape[1], data['train_texts'].shape[1]), args)
    train(run, row, seed, data, args)
    code_loss = run['code_loss']
    return dict(val=evaluate(run, data, 'val'), test=evaluate(run, data, 'test'),
                end=dict(temperature=float(run['align_loss'].temperature.detach()),
                         code_perplexity=float(code_loss.codebook.perplexity()) if code_loss else float('nan')))


# ---------------------------------------------------------------------------------- tables
def format_table(results: Mapping[str, Mapping[int, dict]], split: str) -> str:
    """Markdown table of one split: per row mean ± std of each metric and the paired difference
    of ``r_mean`` to row (b), to the row of the same objective without the codebook (the
    decomposition), and, for codebook rows, to the default codebook row."""
    head = ('| row | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | mean of six | Δ vs (b), 95 % CI | '
            'seeds ahead of (b) | Δ vs same objective without codebook, 95 % CI | seeds ahead | '
            'Δ vs default codebook row, 95 % CI | γ end |')
    lines = [head, '|' + '---|' * 14]
    seeds = sorted(next(iter(results.values())))

    def versus(row, reference):
        if reference not in results or row == reference:
            return '—', '—'
        p = paired_difference([results[row][s][split]['r_mean'] for s in seeds],
                              [results[reference][s][split]['r_mean'] for s in seeds])
        return f"{p['mean']:+.2f} ± {p['half_width']:.2f}", f"{p['positive']}/{p['n']}"

    for row, per_seed in results.items():
        spec = ROWS[row]
        cells = [mean_std([per_seed[s][split][m] for s in seeds]) for m in METRICS]
        diff, ahead = versus(row, BASELINE)
        own = versus(row, OBJECTIVE_BASELINE[spec.objective]) if spec.codebook else ('—', '—')
        diff_default, _ = versus(row, DEFAULT_CODEBOOK_ROW) if spec.codebook else ('—', '—')
        gamma = statistics.fmean(per_seed[s]['end']['temperature'] for s in seeds)
        lines.append(f'| {spec.title} | ' + ' | '.join(cells)
                     + f' | {diff} | {ahead} | {own[0]} | {own[1]} | {diff_default} | {gamma:.3f} |')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=osp.join(ROOT, 'data', 'emoji'), help='prepare_emoji output dir')
    parser.add_argument('--cache', default=None, help='feature cache dir (default DATA/_features)')
    parser.add_argument('--rows', nargs='+', default=['default'], metavar='ROW',
                        help=f'rows or groups of rows ({", ".join(ROW_GROUPS)}); rows: {", ".join(ROWS)}')
    parser.add_argument('--seeds', type=int, default=10, help='paired seeds 0..N-1 (default 10)')
    parser.add_argument('--quick', action='store_true', help='3 seeds')
    parser.add_argument('--smoke', action='store_true',
                        help='1 seed, 4 epochs, 64-px features, 600 images per split, rows a, b, b_cb128 (CI)')
    parser.add_argument('--max-images', type=int, default=None, help='keep only this many images per split')
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--weight-decay', type=float, default=0.02)
    parser.add_argument('--embed-dim', type=int, default=256)
    parser.add_argument('--hidden', type=int, default=512)
    parser.add_argument('--queue', type=int, default=1024)
    parser.add_argument('--momentum', type=float, default=0.995)
    parser.add_argument('--alpha', type=float, default=0.4)
    parser.add_argument('--image-size', type=int, default=128, help='input side of the image tower (emoji are 64 px)')
    parser.add_argument('--workers', type=int, default=2, help='parallel single-thread runs (default 2)')
    parser.add_argument('--json', help='also write every per-seed result here')
    parser.add_argument('--results-dir', default=None,
                        help='save each finished run here and reuse saved runs (resume); default benchmarks/results/'
                             'real_data_ablation (in the repository, so a later sitting resumes), '
                             "'' to disable")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 3
    if args.smoke:
        args.seeds, args.epochs, args.image_size = 1, 4, 64
        args.max_images = args.max_images or 600
        if args.rows == ['default']:
            args.rows = ['a', 'b', 'b_cb128']
    rows = [BASELINE]
    for name in args.rows:
        if name not in ROWS and name not in ROW_GROUPS:
            parser.error(f'--rows: unknown row or group {name!r}; groups: {list(ROW_GROUPS)}, rows: {list(ROWS)}')
        rows += [r for r in ROW_GROUPS.get(name, [name]) if r not in rows]
    # each codebook row's no-codebook row of the same objective is run too (the decomposition column)
    rows += [OBJECTIVE_BASELINE[ROWS[r].objective] for r in rows if ROWS[r].codebook is not None]
    args.rows = [r for r in ROWS if r in rows]
    args.cache = args.cache or osp.join(args.data, '_features')
    if args.results_dir is None and not args.smoke:
        args.results_dir = osp.join(ROOT, 'benchmarks', 'results', 'real_data_ablation')
    return args


_WORKER: dict = {}


def _init_worker(data: dict, args) -> None:
    torch.set_num_threads(1)      # tiny ops: one process per core beats two threads per process
    _WORKER.update(data=data, args=args)


def _run(job: Tuple[str, int]) -> Tuple[str, int, dict, float]:
    row, seed = job
    t0 = time.perf_counter()
    result = train_and_evaluate(row, seed, _WORKER['data'], _WORKER['args'])
    return row, seed, result, time.perf_counter() - t0


def run_all(data: dict, args) -> Dict[str, Dict[int, dict]]:
    """Every (row, seed), in ``args.workers`` processes of one thread each; results do not
    depend on the number of workers (each run is seeded on its own). With ``--results-dir``
    each finished run is saved (keyed by row, seed and every protocol argument) and reused by
    a later call, so an interrupted benchmark resumes where it stopped."""
    jobs = [(row, seed) for seed in range(args.seeds) for row in args.rows]
    results: Dict[str, Dict[int, dict]] = {row: {} for row in args.rows}

    def report(row, seed, result, seconds, saved=False):
        results[row][seed] = result
        path = result_path(args, row, seed)
        if path and not saved:
            os.makedirs(args.results_dir, exist_ok=True)
            with open(path, 'w') as handle:
                json.dump(result, handle)
        print(f"seed {seed} {row:<20} val r_mean {result['val']['r_mean']:5.1f}  "
              f"test r_mean {result['test']['r_mean']:5.1f}  "
              + ('(saved earlier)' if saved else f'({seconds:.1f} s)'), flush=True)

    todo = []
    for row, seed in jobs:
        path = result_path(args, row, seed)
        if path and osp.isfile(path):
            with open(path) as handle:
                report(row, seed, json.load(handle), 0.0, saved=True)
        else:
            todo.append((row, seed))
    if args.workers <= 1 or len(todo) <= 1:
        _init_worker(data, args)
        for job in todo:
            report(*_run(job))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context('spawn'),
                                 initializer=_init_worker, initargs=(data, args)) as pool:
            for out in pool.map(_run, todo):
                report(*out)
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.workers)
    ensure_data(args.data)
    splits = load_splits(args.data, max_images=args.max_images)
    features = cached_features(args.data, splits, args.image_size, args.cache)
    data = tensors_for(features, splits)
    print(f"train {data['train_images'].shape[0]} pairs; val {data['val_images'].shape[0]} images / "
          f"{len(data['val_txt2img'])} captions; test {data['test_images'].shape[0]} images / "
          f"{len(data['test_txt2img'])} captions; {args.seeds} paired seeds, {args.epochs} epochs, "
          f"{len(args.rows)} rows, {args.workers} worker(s)", flush=True)
    start = time.perf_counter()
    results = run_all(data, args)
    minutes = (time.perf_counter() - start) / 60
    for split in ('val', 'test'):
        print(f'\n## {split} ({"choices are made here" if split == "val" else "held out, never used to choose"}); '
              f'{args.seeds} paired seeds\n')
        print(format_table(results, split))
    print(f'\ntraining + evaluation: {minutes:.1f} min for {len(args.rows)} rows x {args.seeds} seeds '
          f'({args.workers} single-thread worker(s))')
    if args.json:
        with open(args.json, 'w') as handle:
            json.dump(dict(args=vars(args), results=results), handle, indent=1)
    return results


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
