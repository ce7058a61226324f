"""Draw a finished (or running) training run's pictures from its work dir.

Usage::

    python -m vlp_codebook.tools.plot WORK_DIR [--out DIR] [--no-gallery]
    mim run vlp_codebook plot WORK_DIR

Reads ``WORK_DIR/<latest run>/vis_data/scalars.json`` and writes into ``WORK_DIR/plots/`` (or
``--out``) the same PNGs as ``TrainingPlotsHook`` (:mod:`vlp_codebook.analysis.plots`):
``losses.png``, ``retrieval.png``, ``codebook.png`` and ``gallery.png``. The codeword usage comes
from ``plots/codebook_usage.json`` (written by the hook), else from the checkpoint's codebook
``usage`` buffer. The gallery needs the model: a config file you name with ``--config`` (Python:
executed, so only name a file you trust) and the last checkpoint of the work dir (or
``--checkpoint``, read as data). Nothing found in the work dir is built or executed: its files are
read as numbers and names only, and without ``--config`` the gallery is skipped.
"""
from __future__ import annotations

import argparse
import glob
import os.path as osp
from typing import List, Optional

import torch

from vlp_codebook.tools.train import add_cfg_options

__all__ = ['parse_args', 'main']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from vlp_codebook.checkpoint_io import TRUST_FLAG
    parser = argparse.ArgumentParser(prog='vlp_codebook.tools.plot', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('work_dir', help='the work dir of a training run (or its scalars.json)')
    parser.add_argument('--out', default=None, help='output folder (default: WORK_DIR/plots)')
    parser.add_argument('--config', default=None,
                        help='config file for the gallery; it is Python and is executed (without it: no gallery)')
    parser.add_argument('--checkpoint', default=None,
                        help='checkpoint for the gallery and the usage (default: WORK_DIR/last_checkpoint)')
    parser.add_argument('--no-gallery', action='store_true', help='skip the retrieval gallery (no model is built)')
    parser.add_argument('--gallery-images', type=int, default=100, help='candidate images (default 100)')
    parser.add_argument(TRUST_FLAG, dest='trust_checkpoint', action='store_true',
                        help='unpickle the checkpoint freely (only for files you wrote yourself)')
    add_cfg_options(parser, 'val_dataloader.dataset.num_images=50')
    return parser.parse_args(argv)


def _work_dir_of(path: str) -> str:
    """The work dir above a scalars.json / vis_data / run folder given instead of it."""
    path = osp.abspath(path)
    if osp.isfile(path):
        path = osp.dirname(path)
    if osp.basename(path) == 'vis_data':
        path = osp.dirname(path)
    if osp.isdir(osp.join(path, 'vis_data')):
        path = osp.dirname(path)
    return path


def _last_checkpoint(work_dir: str) -> Optional[str]:
    """The work dir's checkpoint ``last_checkpoint`` names (a file of the work dir, by name), else its newest."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer, encoding='utf-8', errors='replace') as handle:
            named = osp.join(work_dir, osp.basename(handle.read().strip()))
        if osp.isfile(named):
            return named
    found = sorted(glob.glob(osp.join(glob.escape(work_dir), '*.pth')), key=osp.getmtime)
    return found[-1] if found else None


def _usage(plots_dir: str, checkpoint: Optional[str], trust: bool):
    from vlp_codebook.analysis.scalars import read_usage
    usage = read_usage(osp.join(plots_dir, 'codebook_usage.json'))
    if usage is not None or checkpoint is None or not osp.isfile(checkpoint):
        return usage
    from vlp_codebook.checkpoint_io import read_checkpoint
    state = read_checkpoint(checkpoint, map_location='cpu', trust=trust or None)
    state = state.get('state_dict', state) if isinstance(state, dict) else {}
    for key, value in state.items():
        if key.endswith('codebook.usage') and not key.startswith('teacher') and isinstance(value, torch.Tensor):
            return value.float().tolist()
    return None


def _gallery(args, work_dir: str, checkpoint: Optional[str]):
    if args.no_gallery:
        return None, ''
    if args.config is None or checkpoint is None:
        print(f'no gallery: pass --config CONFIG (the config of the run: Python, executed; nothing in {work_dir} '
              'is built)' if args.config is None else f'no gallery: no checkpoint in {work_dir} (pass --checkpoint)')
        return None, ''
    from vlp_codebook.analysis.gallery import retrieval_gallery
    from vlp_codebook.engine.checkpoint_coverage import load_model_weights
    from vlp_codebook.engine.config import load_config
    from vlp_codebook.registry import DATASETS, MODELS

    cfg = load_config(args.config, cfg_options=args.cfg_options)
    if cfg.get('val_dataloader') is None:
        print(f'no gallery: {args.config} has no val_dataloader')
        return None, ''
    model = MODELS.build(cfg.model)
    load_model_weights(model, checkpoint, trust=args.trust_checkpoint or None)
    dataset = DATASETS.build(cfg.val_dataloader.dataset)
    queries = retrieval_gallery(model, dataset, num_images=args.gallery_images)
    count = min(args.gallery_images, len(dataset))
    return queries, (f'{osp.basename(checkpoint)}: top 5 of the first {count} validation images '
                     'by embedding similarity')


def main(argv: Optional[List[str]] = None) -> List[str]:
    args = parse_args(argv)
    from vlp_codebook.analysis.plots import plot_run
    from vlp_codebook.analysis.scalars import find_scalars, read_scalars

    scalars = find_scalars(args.work_dir)
    work_dir = _work_dir_of(args.work_dir)
    out = args.out or osp.join(work_dir, 'plots')
    checkpoint = args.checkpoint or _last_checkpoint(work_dir)
    if args.checkpoint is not None and not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'--checkpoint {args.checkpoint!r} does not exist')
    usage = _usage(osp.join(work_dir, 'plots'), checkpoint, args.trust_checkpoint)
    gallery, title = _gallery(args, work_dir, checkpoint)
    written = plot_run(read_scalars(scalars), out, usage=usage, gallery=gallery, gallery_title=title)
    print(f'read {scalars}; wrote {", ".join(osp.basename(p) for p in written)} to {out}')
    return written


if __name__ == '__main__':
    import sys

    from vlp_codebook.tools.cli import run_main

    run_main(main, sys.argv[1:], prog='vlp_codebook.tools.plot')
