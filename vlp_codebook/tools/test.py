"""Evaluate a checkpoint with the mmengine Runner's test loop.

Usage::

    python -m vlp_codebook.tools.test CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options KEY=VALUE ...]
        [--launcher none|pytorch] [--trust-checkpoint] [--allow-missing-weights] [--allow-nonfinite] [--verbose]
    mim run vlp_codebook test CONFIG CHECKPOINT ...      # from a regular (non-editable) install

``CONFIG`` is a path or a shipped config's name (as for the train tool); it must define
``test_dataloader``, ``test_evaluator`` and ``test_cfg``. Prints and returns the metrics.

The checkpoint is loaded as data (``weights_only=True`` with an allow-list, see docs/security.md;
``--trust-checkpoint`` for a file you wrote that needs more) and must fill every parameter of
the model: metrics of a partly random model are refused unless ``--allow-missing-weights``, and
metrics of weights holding NaN or inf unless ``--allow-nonfinite``.
"""
from __future__ import annotations

if __name__ == '__main__':  # before torch is imported: OpenMP wait policy, warning filters
    from vlp_codebook.tools.cli import prepare_process

    prepare_process()

import argparse
import os.path as osp
import sys
from typing import Dict, List, Optional

import vlp_codebook.engine  # noqa: F401  (registers the hooks)
from mmengine.config import Config

from vlp_codebook.engine.checkpoint import checkpoint_loading

from vlp_codebook.engine.config import load_config
from vlp_codebook.engine.registry_errors import explain_unknown_types
from vlp_codebook.tools.cli import cpu_threads_from
from vlp_codebook.tools.train import (add_checkpoint_coverage_hook, add_nonfinite_arg, build_runner,
                                      default_work_dir, parse_with_common_args)

__all__ = ['parse_args', 'build_test_config', 'main']

_TEST_KEYS = ('test_dataloader', 'test_evaluator', 'test_cfg')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='vlp_codebook.tools.test', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file path, or the name of a shipped config')
    parser.add_argument('checkpoint', help='checkpoint file (.pth written by the train tool or convert_albef)')
    parser.add_argument('--work-dir', help='directory for the test logs (default: the config\'s work_dir, '
                        'else ./work_dirs/<config name>)')
    add_nonfinite_arg(parser)
    return parse_with_common_args(parser, argv, 'test_dataloader.batch_size=8')


def build_test_config(args: argparse.Namespace) -> Config:
    """The config for testing ``args.checkpoint``.

    Raises:
        FileNotFoundError: the checkpoint (a local path) does not exist.
        ValueError: the config lacks one of ``test_dataloader``, ``test_evaluator``, ``test_cfg``.
    """
    checkpoint = osp.expanduser(args.checkpoint)
    if '://' not in checkpoint and not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist '
                                f'(resolved path: {osp.abspath(checkpoint)})')
    cfg = load_config(args.config, cfg_options=args.cfg_options)
    missing = [key for key in _TEST_KEYS if cfg.get(key) is None]
    if missing:
        raise ValueError(f'config {args.config!r} cannot be tested: it has no {", ".join(missing)} '
                         f'(the test tool needs {", ".join(_TEST_KEYS)})')
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or default_work_dir(cfg)
    cfg.load_from = checkpoint
    cfg.resume = False
    add_checkpoint_coverage_hook(cfg, 'evaluate', getattr(args, 'allow_missing_weights', False),
                                 getattr(args, 'allow_nonfinite', False))
    return cfg


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    """Test; returns the metrics dict of ``runner.test()``."""
    args = parse_args(argv)
    cfg = build_test_config(args)
    with cpu_threads_from(cfg), checkpoint_loading(trust=args.trust_checkpoint or None):
        runner = build_runner(cfg, args.launcher, verbose=args.verbose)
        with explain_unknown_types():
            metrics = runner.test()
    return metrics


if __name__ == '__main__':
    from vlp_codebook.tools.cli import run_main

    run_main(main, sys.argv[1:], prog='vlp_codebook.tools.test')
