"""open_clip_train's own ``main`` with the CODIS codebook: ``python -m vlp_codebook_openclip.train``.

Usage (every open_clip_train flag, plus the plugin's: ``--help`` lists both)::

    python -m vlp_codebook_openclip.train --model codis-tiny-vit --train-data train.csv \\
        --dataset-type csv --csv-separator $'\\t' --batch-size 32 --epochs 2 --workers 0 \\
        --codebook-size 1024 --codebook-weight 1.0 [--codebook-plan-features teacher] \\
        [--codis-intra --codis-momentum 0.995 --queue-size 4096]

Nothing of open_clip_train is copied or forked. For the duration of the call, the names that
``open_clip_train.main`` looks up below are replaced by thin wrappers around the originals:

* ``create_model_and_transforms``: runs inside :func:`vlp_codebook.checkpoint_io.torch_load_as_data`,
  so the ``torch.load`` of open_clip's loader reads a ``--pretrained`` file against the schema
  (refused, naming the file, unless it holds tensors and plain containers only; safetensors and
  numpy files hold no pickle and open_clip reads them itself); the model it returns is wrapped in
  :class:`~vlp_codebook_openclip.model.CodebookCLIP` (so open_clip's optimizer, grad scaler,
  DDP, checkpoints and ``--lock-*`` flags see the codebook, teacher and queues);
* ``create_loss``: open_clip's loss, wrapped in :class:`~vlp_codebook_openclip.loss.CodebookClipLoss`;
* ``train_one_epoch``: first reseeds torch / numpy / random from ``(--seed, epoch, rank)``, so a
  ``--resume``-d run sees the batches and augmentations an uninterrupted one would have (plain
  open_clip_train seeds once per process), sets the teacher's alpha ramp to one epoch and binds
  the codebook statistics to open_clip's logging and TensorBoard writer;
* ``pt_load``: checkpoints are read against the schema of :mod:`vlp_codebook.checkpoint_io`
  (tensors and plain data only; a file that would run code or exhaust memory is refused);
* ``parse_args``: refuses, naming the flag, settings the plugin does not support;
* ``setup_logging``: the console shows progress and numbers (``Train Epoch``, ``codebook step``
  ..., warnings); the model printout and the arguments go to the log file only (``--verbose``:
  everything on the console too); torch's loggers stay at WARNING; when ``main`` returns, the
  logging set-up (open_clip's handlers and levels, and ours) is undone;
* ``optim`` (the ``torch.optim`` module it builds AdamW from): the codewords get a parameter
  group of their own, with weight decay ``--codebook-wd`` (default 0: open_clip decays every
  matrix, and decay only shrinks codewords that are normalised when used);
* ``torch.nn.parallel.DistributedDataParallel``: on CPU, without the ``device_ids=[cpu]`` that
  open_clip_train passes and torch refuses (so ``torchrun ... --dist-backend gloo`` runs on CPU);
* open_clip's HF architecture table gets BERT's layer names where it lacks them, so
  ``--lock-text-unlocked-layers N`` works for BERT-family text towers (open_clip 3.3.0 raises
  ``KeyError: 'layer_attr'``).
"""
from __future__ import annotations

import contextlib
import logging
import os.path as osp
import random
import sys
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from vlp_codebook.checkpoint_io import torch_load_as_data
from vlp_codebook_openclip.loss import CodebookClipLoss
from vlp_codebook_openclip.model import CodebookCLIP
from vlp_codebook_openclip.options import (build_parser, check_compatible, codebook_model_kwargs,
                                           parse_codebook_args)

__all__ = ['main', 'MODEL_CONFIG_DIR', 'register_model_configs', 'epoch_seed', 'load_checkpoint_data']

MODEL_CONFIG_DIR = osp.join(osp.dirname(osp.abspath(__file__)), 'model_configs')


def register_model_configs(extra_dirs: Sequence[str] = ()) -> None:
    """Make the plugin's open_clip model configs (and those in ``extra_dirs``) known to open_clip."""
    import open_clip
    for directory in [MODEL_CONFIG_DIR, *extra_dirs]:
        if not osp.isdir(directory):
            raise FileNotFoundError(f'--model-config-dir {directory}: no such directory')
        open_clip.add_model_config(directory)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of epoch ``epoch`` on rank ``rank`` (distinct per pair, fits numpy's 32 bits)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank)) % (2 ** 32)


def load_checkpoint_data(file_path: str, map_location=None):
    """open_clip_train's ``pt_load`` (local or fsspec paths) through the schema reader
    (:func:`vlp_codebook.checkpoint_io.read_checkpoint`; opt-in: ``VLP_CODEBOOK_TRUST_CHECKPOINTS=1``).
    A resume checkpoint's ``epoch`` must be an integer >= 0: open_clip resumes its loop from it and,
    with ``--delete-previous-checkpoint``, removes the run's ``epoch_{epoch}.pt`` after the next one."""
    import fsspec

    from vlp_codebook.checkpoint_io import UntrustedCheckpointError, read_checkpoint
    with fsspec.open(file_path, 'rb') as handle:
        checkpoint = read_checkpoint(handle, map_location=map_location, label=str(file_path))
    epoch = checkpoint.get('epoch', 0) if isinstance(checkpoint, dict) else 0
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise UntrustedCheckpointError(f'refusing to resume from {file_path}: its "epoch" is {epoch!r}, '
                                       'not an integer >= 0 (open_clip_train resumes and prunes checkpoints by it)')
    return checkpoint


_REPLACED = ('create_model_and_transforms', 'create_loss', 'train_one_epoch', 'pt_load', 'parse_args', 'optim',
             'setup_logging')
# What the console shows without --verbose: progress and numbers (the rest is in the log file).
CONSOLE_PREFIXES = ('Start epoch', 'Train Epoch', 'Eval Epoch', 'codebook step', 'vlp_codebook_openclip')


def _console_record(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or str(record.msg).startswith(CONSOLE_PREFIXES)


@contextlib.contextmanager
def injected(options) -> Iterator[None]:
    """Replace open_clip_train.main's factories for the duration of one ``main`` call; every
    replaced name (and torch's DDP class, open_clip's BERT architecture names) is restored, and so
    is the logging set-up (open_clip's ``setup_logging`` adds handlers and sets every logger's level)."""
    import open_clip_train.main as oc_main

    logging_state = _logging_state()
    originals = {name: getattr(oc_main, name) for name in _REPLACED}
    for name, value in _replacements(options, originals).items():
        setattr(oc_main, name, value)
    ddp_class = torch.nn.parallel.DistributedDataParallel
    torch.nn.parallel.DistributedDataParallel = _cpu_friendly_ddp(ddp_class)
    added_names = _complete_bert_arch_names()
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(oc_main, name, value)
        torch.nn.parallel.DistributedDataParallel = ddp_class
        for names, key in added_names:
            names.pop(key, None)
        _restore_logging(logging_state)


def _logging_state() -> tuple:
    """The root logger's level and handlers, and the level of every logger that exists now."""
    levels = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}
    return logging.root.level, list(logging.root.handlers), levels


def _restore_logging(state: tuple) -> None:
    """Undo a ``setup_logging`` call: handlers added since ``state`` are closed and removed, and
    every logger's level is set back (loggers made since then go back to NOTSET)."""
    root_level, handlers, levels = state
    for handler in [h for h in logging.root.handlers if h not in handlers]:
        logging.root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.filters = [f for f in handler.filters if f is not _console_record]
    logging.root.setLevel(root_level)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            logger.setLevel(levels.get(name, logging.NOTSET))


def _replacements(options, originals) -> dict:
    """The thin wrappers around open_clip_train.main's originals (see the module docstring)."""
    from open_clip_train.distributed import is_master
    from open_clip_train.train import unwrap_model
    wrapped_models = []

    def parse_args(args):
        parsed = originals['parse_args'](args)
        check_compatible(options, parsed)
        return parsed

    def create_model_and_transforms(*args, **kwargs):
        with torch_load_as_data():   # --pretrained (and every torch.load open_clip makes) read as data, once
            model, preprocess_train, preprocess_val = originals['create_model_and_transforms'](*args, **kwargs)
        if options.no_codebook or wrapped_models:      # the baseline, or a --distill-model
            return model, preprocess_train, preprocess_val
        model = CodebookCLIP(model, **codebook_model_kwargs(options))
        if kwargs.get('device') is not None:
            model = model.to(kwargs['device'])
        wrapped_models.append(model)
        logging.info('vlp_codebook_openclip: %s', ', '.join(f'{k}={v}' for k, v in sorted(vars(options).items())))
        return model, preprocess_train, preprocess_val

    def create_loss(args):
        loss = originals['create_loss'](args)
        return loss if options.no_codebook else CodebookClipLoss(loss)

    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        seed = epoch_seed(args.seed, epoch, args.rank)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        steps_per_epoch = data['train'].dataloader.num_batches // args.accum_freq
        core = unwrap_model(model)
        if isinstance(core, CodebookCLIP):
            core.set_steps_per_epoch(steps_per_epoch)
            warmup = core.codebook_loss.warmup_steps if core.codebook_loss is not None else 0
            if warmup and epoch == 0 and is_master(args):
                logging.info('vlp_codebook_openclip: the codebook terms are 0 for the first %d steps%s '
                             '(--codebook-warmup-steps N to change, 0: none)', warmup,
                             ' (one epoch)' if core.warmup_one_epoch else '')
                if warmup >= args.epochs * steps_per_epoch:
                    logging.warning('vlp_codebook_openclip: the codebook warm-up (%d steps) lasts the whole run '
                                    '(%d epochs of %d steps): the codebook never trains; set '
                                    '--codebook-warmup-steps below that', warmup, args.epochs, steps_per_epoch)
        if isinstance(loss, CodebookClipLoss):
            loss.bind_logging(tb_writer, args.log_every_n_steps, first_step=epoch * steps_per_epoch,
                              is_master=is_master(args))
        return originals['train_one_epoch'](model, data, loss, epoch, optimizer, scaler, scheduler,
                                            dist_model, args, tb_writer=tb_writer)

    codewords = lambda: [m.codebook.weight for m in wrapped_models if m.codebook is not None]  # noqa: E731
    return dict(create_model_and_transforms=create_model_and_transforms, create_loss=create_loss,
                train_one_epoch=train_one_epoch, pt_load=load_checkpoint_data, parse_args=parse_args,
                optim=CodewordDecayOptim(codewords, options.codebook_wd),
                setup_logging=_quiet_setup_logging(originals['setup_logging'], options.verbose))


def _quiet_setup_logging(original, verbose: bool):
    """open_clip's ``setup_logging``, then: torch's loggers back at WARNING (open_clip sets every
    logger to its level, so torch would print compile statistics at exit) and, unless
    ``verbose``, a console that shows only progress and numbers (the log file keeps everything)."""
    def setup_logging(log_file, level, include_host=False):
        original(log_file, level, include_host)
        for name in list(logging.root.manager.loggerDict):
            if name == 'torch' or name.startswith('torch.'):
                logging.getLogger(name).setLevel(logging.WARNING)
        if not verbose:
            for handler in logging.root.handlers:
                if type(handler) is logging.StreamHandler:
                    handler.addFilter(_console_record)
            if log_file:
                print(f'vlp_codebook_openclip: progress here, everything in {log_file} (--verbose: all here)',
                      flush=True)
    return setup_logging


class CodewordDecayOptim:
    """``torch.optim`` as open_clip_train.main sees it, except that ``AdamW`` puts the codewords
    in a parameter group of their own with weight decay ``--codebook-wd`` (open_clip 3.3.0 decays
    every parameter of two or more dimensions; its timm optimizers ask ``no_weight_decay()``).
    The groups are made when the optimizer is created, so a resumed run rebuilds the same ones."""

    def __init__(self, codewords, weight_decay: float):
        self._codewords = codewords
        self.weight_decay = float(weight_decay)

    def __getattr__(self, name):
        return getattr(torch.optim, name)

    def AdamW(self, param_groups, *args, **kwargs):  # noqa: N802 (torch.optim's name)
        codewords = {id(p) for p in self._codewords()}
        groups, moved = [], []
        for group in param_groups:
            params = list(group['params'])
            moved += [p for p in params if id(p) in codewords]
            groups.append({**group, 'params': [p for p in params if id(p) not in codewords]})
        if moved:
            groups.append({'params': moved, 'weight_decay': self.weight_decay})
        return torch.optim.AdamW(groups, *args, **kwargs)


def _complete_bert_arch_names():
    """open_clip 3.3.0's HF text tower locks the first layers of ``--lock-text-unlocked-layers N``
    through ``arch_dict[model_type]['config_names']['layer_attr' / 'token_embeddings_attr']``,
    which its table lacks for BERT (a KeyError: 'layer_attr'). Add BERT's names (``encoder.layer``,
    ``embeddings``) where missing; returns what was added, to take it back."""
    from open_clip.hf_configs import arch_dict
    added = []
    names = arch_dict.get('bert', {}).get('config_names')
    if names is not None:
        for key, value in (('layer_attr', 'layer'), ('token_embeddings_attr', 'embeddings')):
            if key not in names:
                names[key] = value
                added.append((names, key))
    return added


def _cpu_friendly_ddp(ddp_class):
    """open_clip_train passes ``device_ids=[device]`` to DDP also when the device is the CPU, which
    torch refuses (CPU modules take no device_ids): drop them there, so ``torchrun`` with
    ``--dist-backend gloo`` trains on CPU. A subclass, so isinstance checks still hold."""

    class DistributedDataParallel(ddp_class):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == 'cpu' for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    return DistributedDataParallel


def main(argv: Optional[Sequence[str]] = None):
    argv: List[str] = list(sys.argv[1:] if argv is None else argv)
    if '-h' in argv or '--help' in argv:
        build_parser().print_help()
        print('\nopen_clip_train flags:\n')
        from open_clip_train.params import parse_args
        parse_args(['--help'])
        return 0
    options, rest = parse_codebook_args(argv)
    from vlp_codebook_openclip.csv_check import check_csv_args
    check_csv_args(rest)   # a wrong separator or an empty caption, named before open_clip reads them
    register_model_configs(options.model_config_dir)
    import open_clip_train.main as oc_main
    with injected(options):
        status = oc_main.main(rest)
    if status not in (None, 0):       # e.g. -1: "Experiment already exists" (printed by open_clip)
        raise SystemExit(1)
    return 0


if __name__ == '__main__':
    from vlp_codebook.tools.cli import prepare_process, run_main
    prepare_process()
    run_main(main, sys.argv[1:], prog='vlp_codebook_openclip.train')
