"""Train any vlp_codebook config with the mmengine Runner.

Usage::

    python -m vlp_codebook.tools.train CONFIG [--work-dir DIR] [--resume [CKPT|auto]] [--amp]
        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch]
    mim run vlp_codebook train CONFIG ...          # from a regular (non-editable) install
    torchrun --nproc_per_node 2 -m vlp_codebook.tools.train CONFIG --launcher pytorch   # 2 CPU procs

``CONFIG`` is a path or a shipped config's name (:func:`vlp_codebook.engine.config.resolve_config`).
``--resume`` alone continues from the newest intact checkpoint (:mod:`vlp_codebook.engine.resume`);
``--amp``: fp16 with CUDA, bfloat16 autocast on CPU; ``--verbose``: mmengine's full console output
and tracebacks (:mod:`vlp_codebook.tools.tool_runner`).
"""
from __future__ import annotations

if __name__ == '__main__':  # before torch is imported: OpenMP wait policy, warning filters
    from vlp_codebook.tools.cli import prepare_process

    prepare_process()

import argparse
import os
import os.path as osp
import sys
from typing import List, Optional

# registers the hooks and optim wrappers before anything is built
import vlp_codebook.engine  # noqa: F401  (import for its registrations)
from mmengine.config import Config, DictAction

from vlp_codebook.checkpoint_io import TRUST_ENV
from vlp_codebook.engine.checkpoint import checkpoint_loading
from vlp_codebook.engine.checkpoint_saving import use_atomic_checkpoint_hook
from vlp_codebook.engine.config import load_config
from vlp_codebook.engine.distributed import LAUNCHERS, setup_launcher
from vlp_codebook.engine.iteration_seed import IterationSeedHook
from vlp_codebook.engine.registry_errors import explain_unknown_types
from vlp_codebook.tools.cli import cpu_threads_from

__all__ = ['parse_args', 'build_train_config', 'build_runner', 'main']

_AMP_WRAPPERS = ('AmpOptimWrapper', 'BF16AutocastOptimWrapper')
_runs_in_this_process = 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='vlp_codebook.tools.train', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file path, or the name of a shipped config')
    parser.add_argument('--work-dir', help='directory for logs and checkpoints '
                        '(default: the config\'s work_dir, else ./work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT|auto',
                        help='resume from CKPT, or (no value / "auto") from the latest checkpoint '
                        'in the work dir')
    parser.add_argument('--amp', action='store_true', help='mixed precision (fp16 with CUDA, bf16 on CPU)')
    return parse_with_common_args(parser, argv, 'train_cfg.max_iters=10 optim_wrapper.optimizer.lr=1e-4')


def add_cfg_options(parser: argparse.ArgumentParser, cfg_example: str) -> None:
    """``--cfg-options KEY=VALUE ...``: config overrides, as every tool that reads a config takes them."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help=f'override config entries, e.g. {cfg_example}')


def parse_with_common_args(parser: argparse.ArgumentParser, argv: Optional[List[str]],
                           cfg_example: str) -> argparse.Namespace:
    """Add the options the train and test tools share (--cfg-options, --launcher), then parse."""
    add_cfg_options(parser, cfg_example)
    parser.add_argument('--verbose', action='store_true',
                        help='print the environment, the config, the hooks, every loss term and '
                        'tracebacks on the console (default: in the log file only)')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help='"pytorch" when started by torchrun (gloo on CPU, nccl on GPU)')
    add_checkpoint_args(parser)
    # torch.distributed.launch (deprecated) passes --local-rank; torchrun sets LOCAL_RANK
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint`` and ``--allow-missing-weights`` (see docs/security.md)."""
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='unpickle checkpoints without the allow-list (weights_only=False): ONLY for files '
                        f'you wrote yourself; same as {TRUST_ENV}=1')
    parser.add_argument('--allow-missing-weights', action='store_true',
                        help='go on (with a warning) when the checkpoint leaves model weights unloaded')


def add_nonfinite_arg(parser: argparse.ArgumentParser) -> None:
    """``--allow-nonfinite`` of the tools that refuse NaN/inf weights (test, gradcam)."""
    parser.add_argument('--allow-nonfinite', action='store_true',
                        help='go on (with a warning) when the checkpoint\'s weights hold NaN or inf')


def add_checkpoint_coverage_hook(cfg: Config, mode: str, allow_missing: bool = False,
                                 allow_nonfinite: bool = False) -> None:
    """Check the loaded checkpoint against the model (:class:`CheckpointCoverageHook`); in
    ``'evaluate'`` mode also refuse NaN/inf weights unless ``allow_nonfinite``."""
    hooks = [h for h in (cfg.get('custom_hooks') or [])
             if not (isinstance(h, dict) and h.get('type') == 'CheckpointCoverageHook')]
    hooks.append(dict(type='CheckpointCoverageHook', mode=mode, allow_missing=allow_missing,
                      expected_missing=cfg.get('load_from_expected_missing'), allow_nonfinite=allow_nonfinite))
    cfg.custom_hooks = hooks


def default_work_dir(cfg: Config) -> str:
    return osp.join('./work_dirs', osp.splitext(osp.basename(cfg.filename))[0])


def enable_amp(cfg: Config) -> None:
    """Switch ``cfg.optim_wrapper`` to mixed precision (fp16 + loss scaling on CUDA, bf16 on CPU)."""
    import torch

    wrapper = cfg.get('optim_wrapper')
    if wrapper is None:
        raise ValueError('--amp: the config has no optim_wrapper to switch to mixed precision')
    current = wrapper.get('type', 'OptimWrapper')
    if current in _AMP_WRAPPERS:
        return
    if current != 'OptimWrapper':
        raise ValueError(f'--amp: optim_wrapper.type={current!r}; --amp can only replace '
                         f'\'OptimWrapper\' (set one of {_AMP_WRAPPERS} in the config instead)')
    if torch.cuda.is_available():
        wrapper['type'] = 'AmpOptimWrapper'
        wrapper.setdefault('loss_scale', 'dynamic')
    else:
        wrapper['type'] = 'BF16AutocastOptimWrapper'


def add_iteration_seed_hook(cfg: Config) -> None:
    """Append ``IterationSeedHook`` (exact resumption, see :mod:`vlp_codebook.engine.iteration_seed`)."""
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(isinstance(hook, dict) and hook.get('type') in ('IterationSeedHook', IterationSeedHook)
               for hook in hooks):
        hooks.append(dict(type='IterationSeedHook'))
    cfg.custom_hooks = hooks


def build_train_config(args: argparse.Namespace) -> Config:
    """The config the Runner is built from: file + options + command-line flags."""
    cfg = load_config(args.config, cfg_options=args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or default_work_dir(cfg)
    if args.amp:
        enable_amp(cfg)
    add_iteration_seed_hook(cfg)
    use_atomic_checkpoint_hook(cfg)   # crash-safe saving (temp file, fsync, rename)
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        checkpoint = osp.expanduser(args.resume)
        if '://' not in checkpoint and not osp.isfile(checkpoint):
            raise FileNotFoundError(f'--resume {args.resume!r}: no such checkpoint file '
                                    f'(resolved path: {osp.abspath(checkpoint)})')
        cfg.resume = True
        cfg.load_from = checkpoint
    if cfg.get('resume') or cfg.get('load_from'):
        add_checkpoint_coverage_hook(cfg, 'resume' if cfg.get('resume') else 'finetune',
                                     getattr(args, 'allow_missing_weights', False))
    return cfg


def build_runner(cfg: Config, launcher: str = 'none', verbose: bool = False):
    """Set up the launcher (gloo on CPU) and build the Runner, with readable unknown-type errors.

    The Runner is a :class:`~vlp_codebook.tools.tool_runner.ToolRunner` (quiet console, build
    errors naming their config key; ``verbose=True``: mmengine's full console output), unless
    the config names its own ``runner_type``.
    """
    from mmengine.registry import RUNNERS

    from vlp_codebook.tools.tool_runner import ToolRunner, VerboseToolRunner

    global _runs_in_this_process
    setup_launcher(cfg, launcher)
    if _runs_in_this_process and not cfg.get('experiment_name'):
        # mmengine keys its global MessageHub/logger instances by experiment name + timestamp
        # (1 s resolution): a second run in the same process must not reuse the first's state
        cfg.experiment_name = f'{osp.splitext(osp.basename(cfg.filename))[0]}_run{_runs_in_this_process}'
    _runs_in_this_process += 1
    with explain_unknown_types():
        if 'runner_type' in cfg:
            return RUNNERS.build(cfg)
        return (VerboseToolRunner if verbose else ToolRunner).from_cfg(cfg)


def main(argv: Optional[List[str]] = None):
    """Train; returns the Runner (its ``message_hub`` holds the logged scalars)."""
    args = parse_args(argv)
    cfg = build_train_config(args)
    # checkpoints (resume, load_from, encoders' pretrained=) load as data inside this block
    with cpu_threads_from(cfg), checkpoint_loading(trust=args.trust_checkpoint or None):
        runner = build_runner(cfg, args.launcher, verbose=args.verbose)
        with explain_unknown_types():
            runner.train()
    return runner


if __name__ == '__main__':
    from vlp_codebook.tools.cli import run_main

    run_main(main, sys.argv[1:], prog='vlp_codebook.tools.train')
