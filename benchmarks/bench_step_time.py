"""Benchmark: training-step time of ablation row (a) vs full CODIS, same model size.

Row (a) is ALBEF's objectives (MLM + ITM + ITC cross directions, ``configs/ablations/a_cross.py``);
full CODIS adds the intra-modal directions (i2i, t2t) and the codebook OT loss
(``configs/ablations/b_codebook_teacher.py``). Both are built from the same configs at the
chosen size, fed the same random batch, and timed in alternation (forward + backward +
AdamW step, median of ``--steps`` after ``--warmup``), so the ratio is measured side by side.

Usage::

    python benchmarks/bench_step_time.py --size small
    python benchmarks/bench_step_time.py --size base --batch 8 --steps 3   # paper size, slow on CPU

Sizes: ``tiny`` (hidden 64, 2+1+1 layers, 32 px), ``small`` (hidden 256, 4+2+2 layers, 128 px),
``base`` (the paper's ViT-B/16 at 256 px + BERT-base 6+6, queue 65536, K 1024).
"""
from __future__ import annotations

import argparse
import copy
import os.path as osp
import statistics
import time

import torch
from mmengine.config import Config

from vlp_codebook.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
VOCAB = [f'w{i}' for i in range(1000)]

SIZES = {
    'tiny': dict(image_size=32, patch=8, hidden=64, vit_layers=2, text_layers=1, fusion_layers=1, heads=4,
                 queue=1024, codewords=128, embed=32),
    'small': dict(image_size=128, patch=16, hidden=256, vit_layers=4, text_layers=2, fusion_layers=2, heads=4,
                  queue=8192, codewords=1024, embed=128),
    'base': None,  # the config as written
}


def build(config: str, size: str) -> torch.nn.Module:
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'ablations', config))
    model = copy.deepcopy(cfg.model)
    tokenizer = dict(_delete_=True, type='BertTokenizerFromVocab', vocab=VOCAB)
    overrides = dict(data_preprocessor=dict(tokenizer=tokenizer), text_encoder=dict(vocab_size=None))
    s = SIZES[size]
    if s is not None:
        overrides.update(
            embed_dim=s['embed'], queue_size=s['queue'],
            image_encoder=dict(image_size=s['image_size'], patch_size=s['patch'], hidden_size=s['hidden'],
                               num_layers=s['vit_layers'], num_heads=s['heads']),
            text_encoder=dict(vocab_size=None, hidden_size=s['hidden'], num_layers=s['text_layers'],
                              num_heads=s['heads']),
            fusion_encoder=dict(hidden_size=s['hidden'], num_layers=s['fusion_layers'], num_heads=s['heads'],
                                encoder_width=s['hidden']))
        if model.get('codebook_loss') is not None:
            overrides['codebook_loss'] = dict(num_codewords=s['codewords'])
    cfg.merge_from_dict(dict(model=overrides))
    torch.manual_seed(0)
    return MODELS.build(cfg.model).train()


def make_batch(batch: int, image_size: int, words: int = 20):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, image_size, image_size, generator=g)
    texts = [' '.join(VOCAB[j] for j in torch.randint(0, len(VOCAB), (words,), generator=g)) for _ in range(batch)]
    return dict(images=images, texts=texts, image_ids=torch.arange(batch))


def step(model, optim, data):
    t0 = time.perf_counter()
    inputs = model.data_preprocessor(data, True)
    losses = model(**inputs, mode='loss')
    total = sum(v for k, v in losses.items() if k.startswith('loss'))
    optim.zero_grad()
    total.backward()
    optim.step()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', choices=sorted(SIZES), default='small')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    args = parser.parse_args()
    image_size = 256 if SIZES[args.size] is None else SIZES[args.size]['image_size']
    models = {'a: cross only': build('a_cross.py', args.size),
              'full CODIS': build('b_codebook_teacher.py', args.size)}
    optims = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
              for k, m in models.items()}
    data = make_batch(args.batch, image_size)
    times = {k: [] for k in models}
    for i in range(args.warmup + args.steps):
        for k, m in models.items():       # alternate, so drift of the machine hits both
            t = step(m, optims[k], data)
            if i >= args.warmup:
                times[k].append(t)
    params = sum(p.numel() for p in models['full CODIS'].parameters() if p.requires_grad)
    print(f'size={args.size} batch={args.batch} steps={args.steps} torch threads={torch.get_num_threads()} '
          f'trainable params (full)={params / 1e6:.1f}M')
    print('| model | median step s | min step s |')
    print('|---|---|---|')
    for k, ts in times.items():
        print(f'| {k} | {statistics.median(ts):.3f} | {min(ts):.3f} |')
    ratio = statistics.median(times['full CODIS']) / statistics.median(times['a: cross only'])
    print(f'full / row a = {ratio:.3f} (overhead {100 * (ratio - 1):+.1f} %)')


if __name__ == '__main__':
    main()
