"""Draw a finished (or running) training run's pictures from its work dir.

Usage::

    python -m vlp_codebook.tools.plot WORK_DIR [--out DIR] [--no-gallery]
    mim run vlp_codebook plot WORK_DIR

Reads ``WORK_DIR/<latest run>/vis_data/scalars.json`` and writes into ``WORK_DIR/plots/`` (or
``--out``) the same PNGs as ``TrainingPlotsHook`` (:mod:`vlp_codebook.analysis.plots`):
``losses.png``, ``retrieval.png``, ``codebook.png`` and ``gallery.png``. The codeword usage comes
from ``plots/codebook_usage.json`` (written by the hook), else from the checkpoint's codebook
``usage`` buffer. The gallery needs the model: the config the run wrote into the work dir as
data (``<config>.config.json``, read without running any Python; ``custom_imports`` are not
imported), or the config file given with ``--config`` (Python: executed, so only name a file you
trust), and the last checkpoint (or ``--checkpoint``, loaded as data); without them it is skipped.
A ``.py`` file in the work dir is never executed unless it is named with ``--config``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os.path as osp
from typing import List, Optional

from vlp_codebook.tools.train import add_cfg_options

__all__ = ['parse_args', 'main']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from vlp_codebook.engine.checkpoint import TRUST_FLAG
    parser = argparse.ArgumentParser(prog='vlp_codebook.tools.plot', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('work_dir', help='the work dir of a training run (or its scalars.json)')
    parser.add_argument('--out', default=None, help='output folder (default: WORK_DIR/plots)')
    parser.add_argument('--config', default=None,
                        help='config file for the gallery; it is Python and is executed (default: the '
                        'config.json the run wrote in WORK_DIR, read as data)')
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
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer, encoding='utf-8') as handle:
            path = handle.read().strip()
        return path if osp.isfile(path) else osp.join(work_dir, osp.basename(path))
    found = sorted(glob.glob(osp.join(glob.escape(work_dir), '*.pth')), key=osp.getmtime)
    return found[-1] if found else None


def _dumped_config(work_dir: str) -> Optional[str]:
    """The newest ``*.config.json`` the run wrote (data; never a ``.py``, which is code)."""
    from vlp_codebook.engine.config import CONFIG_JSON_SUFFIX

    found = sorted(glob.glob(osp.join(glob.escape(work_dir), '*' + CONFIG_JSON_SUFFIX)), key=osp.getmtime)
    return found[-1] if found else None


def _python_configs(work_dir: str) -> List[str]:
    return sorted(glob.glob(osp.join(glob.escape(work_dir), '*.py')), key=osp.getmtime)


def _usage(plots_dir: str, checkpoint: Optional[str], trust: bool):
    usage_file = osp.join(plots_dir, 'codebook_usage.json')
    if osp.isfile(usage_file):
        with open(usage_file, encoding='utf-8') as handle:
            return json.load(handle)['usage']
    if checkpoint is None or not osp.isfile(checkpoint):
        return None
    from vlp_codebook.engine.checkpoint import load_checkpoint_file
    state = load_checkpoint_file(checkpoint, map_location='cpu', trust=trust or None)
    state = state.get('state_dict', state) if isinstance(state, dict) else {}
    for key, value in state.items():
        if key.endswith('codebook.usage') and not key.startswith('teacher'):
            return value.float().tolist()
    return None


def _gallery(args, work_dir: str, checkpoint: Optional[str]):
    config = args.config or _dumped_config(work_dir)
    if args.no_gallery or config is None or checkpoint is None:
        if args.no_gallery:
            return None, ''
        if config is None:
            python = _python_configs(work_dir)
            also = (f'; {osp.basename(python[-1])} there is Python, run only when named: --config {python[-1]}'
                    if python else '')
            print(f'no gallery: no config.json in {work_dir} (the train tool writes one){also}')
        else:
            print(f'no gallery: no checkpoint in {work_dir} (pass --checkpoint)')
        return None, ''
    from vlp_codebook.analysis.gallery import retrieval_gallery
    from vlp_codebook.engine.checkpoint_coverage import load_model_weights
    from vlp_codebook.engine.config import config_from_json, load_config
    from vlp_codebook.registry import DATASETS, MODELS

    if args.config:   # named by the user: Python, executed
        cfg = load_config(config, cfg_options=args.cfg_options)
    else:             # written by training: data
        cfg = config_from_json(config, cfg_options=args.cfg_options)
    if cfg.get('val_dataloader') is None:
        print(f'no gallery: {config} has no val_dataloader')
        return None, ''
    try:
        model = MODELS.build(cfg.model)
    except KeyError as error:
        if args.config:
            raise
        print(f'no gallery: {config}: {error.args[0] if error.args else error} (a type from the config\'s '
              'custom_imports? Those are not imported from a config.json: pass --config)')
        return None, ''
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
