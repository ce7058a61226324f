"""Train or evaluate with LAVIS's own runner, with the CODIS models registered.

LAVIS's ``train.py`` is not in its wheel; this launcher runs the same steps with LAVIS's pieces::

    python -m vlp_codebook_lavis.train --cfg-path my_codis.yaml [--options run.max_epoch=1 ...]

Differences from LAVIS's script: a relative ``run.output_dir`` is relative to the current
directory (not site-packages); on CPU the launcher hands the runner its model (LAVIS's
``RunnerBase.model`` returns None there); a ``codebook_loss`` / ``intra_modal_loss`` block under
a non-CODIS ``arch`` is an error rather than ignored.

Runtime patches of LAVIS (its runner has no hook for either), made by
:func:`adapted_runner_module` for the duration of :func:`main` and restored when it returns or
raises:

* ``lavis.runners.runner_base.dist`` -> a ``torch.distributed`` whose ``barrier()`` is a no-op
  without a process group (the runner calls it unguarded after every epoch);
* ``lavis.runners.runner_base.PrefetchLoader`` -> :class:`CpuLoader` for ``run.device: cpu``
  (LAVIS's wrapper creates a CUDA stream).

and, by :func:`vlp_codebook.checkpoint_io.torch_load_as_data`, ``torch.load`` -> the schema
reader: every checkpoint the run loads (models' ``finetuned`` / ``pretrained``, ``run.resume_ckpt_path``,
the best model reloaded for testing) is read as tensors and plain data.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

import vlp_codebook_lavis
from vlp_codebook.checkpoint_io import torch_load_as_data
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, init_distributed_mode
from lavis.common.logger import setup_logger
from lavis.common.registry import registry
from lavis.common.utils import now

import lavis.common.optims  # noqa: F401  (registers the lr schedulers)
import lavis.runners  # noqa: F401  (registers runner_base, runner_iter)
import lavis.tasks as lavis_tasks

__all__ = ['parse_args', 'build_config', 'main', 'adapted_runner_module', 'CODIS_BLOCKS']

CODIS_BLOCKS = ('codebook_loss', 'intra_modal_loss')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='LAVIS training with the CODIS models registered')
    parser.add_argument('--cfg-path', required=True, help='LAVIS run config (YAML: model, datasets, run)')
    parser.add_argument('--options', nargs='+', default=None,
                        help='overrides as key=value (dotted keys), e.g. run.max_epoch=1')
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """LAVIS's ``Config`` of ``args``, checked and with ``run.output_dir`` made absolute."""
    if not os.path.isfile(args.cfg_path):
        raise FileNotFoundError(f'--cfg-path {args.cfg_path!r} does not exist')
    cfg = Config(args)
    model_cfg = cfg.model_cfg
    stray = [b for b in CODIS_BLOCKS if model_cfg.get(b) is not None]
    if stray and model_cfg.arch not in vlp_codebook_lavis.MODEL_NAMES:
        raise ValueError(
            f'model.arch={model_cfg.arch!r} ignores model.{stray[0]}: use a CODIS arch '
            f'({", ".join(sorted(vlp_codebook_lavis.MODEL_NAMES))}), e.g. codis_retrieval for albef_retrieval')
    output_dir = cfg.run_cfg.get('output_dir', 'output')
    cfg.run_cfg.output_dir = os.path.abspath(output_dir)
    return cfg


class CpuLoader:
    """LAVIS's ``PrefetchLoader`` interface (iterate, ``len``, attribute pass-through) without CUDA."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def setup_seeds(cfg: Config) -> None:
    seed = int(cfg.run_cfg.get('seed', 42)) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _NoProcessGroupDist:
    """``torch.distributed`` for LAVIS's runner module in a single-process run: ``barrier()``
    is a no-op (the runner calls it unguarded after every epoch), everything else is torch's."""

    @staticmethod
    def barrier(*args, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


@contextlib.contextmanager
def adapted_runner_module(cfg: Config) -> Iterator[None]:
    """LAVIS's runner module patched for a non-distributed / CPU run (the module docstring's
    list), restored on exit."""
    import lavis.runners.runner_base as runner_base
    patches = {}
    if not cfg.run_cfg.distributed:
        patches['dist'] = _NoProcessGroupDist()
    if torch.device(cfg.run_cfg.get('device', 'cuda')).type == 'cpu':
        patches['PrefetchLoader'] = CpuLoader
    saved = {name: getattr(runner_base, name) for name in patches}
    try:
        for name, value in patches.items():
            setattr(runner_base, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(runner_base, name, value)


def main(argv: Optional[List[str]] = None):
    """Run LAVIS's runner on the config; returns the runner (after ``runner.train()``)."""
    args = parse_args(argv)
    job_id = now()
    cfg = build_config(args)
    init_distributed_mode(cfg.run_cfg)
    with adapted_runner_module(cfg), torch_load_as_data():
        return _run(cfg, job_id)


def _run(cfg: Config, job_id: str):
    setup_seeds(cfg)
    setup_logger()
    cfg.pretty_print()
    task = lavis_tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner_name = cfg.run_cfg.get('runner', 'runner_base')
    runner_cls = registry.get_runner_class(runner_name)
    if runner_cls is None:
        raise KeyError(f'run.runner={runner_name!r} is not a LAVIS runner; known: {registry.list_runners()}')
    runner = runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
    if not cfg.run_cfg.distributed and getattr(runner, '_wrapped_model', False) is None:
        # RunnerBase.model sets its (un)wrapped model only when it moves the model to another
        # device: a CPU run would see None.
        runner._wrapped_model = runner._model
    runner.train()
    return runner

if __name__ == '__main__':
    main()
