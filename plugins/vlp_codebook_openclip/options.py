"""The command-line flags the plugin adds to open_clip_train's, and their checks.

Every flag of ``open_clip_train`` keeps its meaning; these are parsed first and removed before
the rest goes to open_clip_train's own parser. open_clip already has ``--momentum`` (the
optimizer momentum of timm optimizers), so the teacher's EMA momentum is ``--codis-momentum``.
"""
from __future__ import annotations

import argparse
import math
from typing import List, Sequence, Tuple

from vlp_codebook_openclip.model import PLAN_FEATURES

__all__ = ['build_parser', 'parse_codebook_args', 'check_compatible', 'codebook_model_kwargs']


def _checked(flag: str, cast, ok, what: str):
    """An argparse ``type``: ``cast(text)``, refused with ``FLAG must be WHAT, got TEXT`` unless ``ok``."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{flag} must be {what}, got {text!r}') from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f'{flag} must be {what}, got {text}')
        return value
    return parse


def _positive_int(flag: str):
    return _checked(flag, int, lambda v: v >= 1, 'a positive integer')


def _positive_float(flag: str):
    return _checked(flag, float, lambda v: math.isfinite(v) and v > 0, 'a finite number > 0')


def _nonnegative_int(flag: str):
    return _checked(flag, int, lambda v: v >= 0, 'an integer >= 0')


def _nonnegative_float(flag: str):
    return _checked(flag, float, lambda v: math.isfinite(v) and v >= 0, 'a finite number >= 0')


def _unit_float(flag: str):
    return _checked(flag, float, lambda v: 0.0 <= v <= 1.0, 'in [0, 1]')


def _init_norm(text: str):
    """``'gaussian'`` (N(0, 1) entries) or a finite number > 0."""
    if text == 'gaussian':
        return text
    return _positive_float('--codebook-init-norm')(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m vlp_codebook_openclip.train', add_help=False, allow_abbrev=False,
        description='open_clip_train with the CODIS codebook. Every open_clip_train flag works as in '
                    '`python -m open_clip_train.main`; these are added:')
    group = parser.add_argument_group('CODIS codebook (vlp_codebook_openclip)')
    group.add_argument('--codebook-size', type=_positive_int('--codebook-size'), default=1024,
                       help='K, the number of codewords (default 1024)')
    group.add_argument('--codebook-weight', type=_nonnegative_float('--codebook-weight'), default=1.0,
                       help='weight of every codebook term (default 1.0; 0 with --codis-intra: the intra '
                            'directions without a codebook)')
    group.add_argument('--codebook-wd', type=_nonnegative_float('--codebook-wd'), default=0.0,
                       help="weight decay of the codewords (default 0; open_clip's --wd decays every "
                            'other matrix). Codewords are normalised when used: decay only shrinks them')
    group.add_argument('--codebook-plan-queue', type=_nonnegative_int('--codebook-plan-queue'), default=None,
                       help='past plan features per modality that each Sinkhorn solve also transports, so '
                            'that batches smaller than the codebook get peaked targets (default: '
                            '--codebook-size; 0: off)')
    group.add_argument('--codebook-warmup-steps', type=_nonnegative_int('--codebook-warmup-steps'), default=None,
                       help='training steps at the start with the codebook terms at zero (default: one '
                            'epoch; 0: off)')
    group.add_argument('--codebook-plan-features', choices=PLAN_FEATURES, default='student',
                       help="features the OT plans are computed from: 'student' (default, no extra "
                            "forward) or 'teacher' (a momentum teacher of the whole model)")
    group.add_argument('--codebook-init-norm', type=_init_norm, default=None,
                       help="norm of the initial codewords: a number > 0 (1.0 = unit norm) or 'gaussian' "
                            "(N(0, 1) entries, norm about sqrt(embed dim): they turn that many times slower "
                            "under AdamW); default: the core's default")
    group.add_argument('--codis-intra', action='store_true',
                       help='add the intra-modal distillation directions i2i and t2t (momentum teacher '
                            '+ feature queues; needs --queue-size)')
    group.add_argument('--codis-momentum', type=_unit_float('--codis-momentum'), default=0.995,
                       help='EMA momentum of the teacher (default 0.995, ALBEF)')
    group.add_argument('--queue-size', type=_positive_int('--queue-size'), default=None,
                       help='past teacher features per modality for --codis-intra')
    group.add_argument('--codis-intra-weight', type=_positive_float('--codis-intra-weight'), default=1.0,
                       help='weight of each intra direction (default 1.0)')
    group.add_argument('--no-codebook', action='store_true',
                       help="train open_clip's model and loss unchanged through this entry point (a "
                            'baseline with the same per-epoch seeding)')
    group.add_argument('--model-config-dir', action='append', default=[], metavar='DIR',
                       help='also register the open_clip model configs (*.json) in DIR (repeatable); '
                            "the plugin's own configs (codis-tiny-vit) are always registered")
    parser.add_argument('--verbose', action='store_true',
                        help="print the traceback of an error, and all of open_clip's log on the console")
    return parser


def parse_codebook_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """Split ``argv`` into (our options, open_clip_train's arguments); checks ours."""
    parser = build_parser()
    options, rest = parser.parse_known_args(list(argv))
    if options.no_codebook:
        given = [flag for flag in ('--codis-intra', '--queue-size', '--codebook-plan-features',
                                   '--codebook-size', '--codebook-weight', '--codebook-init-norm', '--codebook-wd',
                                   '--codebook-plan-queue', '--codebook-warmup-steps')
                 if any(a == flag or a.startswith(flag + '=') for a in argv)]
        if given:
            parser.error(f'--no-codebook trains without the CODIS terms: drop {", ".join(given)}')
    if options.codis_intra and options.queue_size is None:
        parser.error('--codis-intra needs --queue-size N (how many past teacher features per modality '
                     'the intra directions contrast against, e.g. 4096)')
    if options.queue_size is not None and not options.codis_intra:
        parser.error('--queue-size is only used by --codis-intra')
    if options.codebook_weight == 0 and not options.codis_intra:
        parser.error('--codebook-weight 0 is only meaningful with --codis-intra (use --no-codebook for '
                     "open_clip's loss alone)")
    return options, rest


def check_compatible(options: argparse.Namespace, args: argparse.Namespace) -> None:
    """Refuse, naming the flags, open_clip_train settings the plugin does not support."""
    if options.no_codebook:
        return
    problems = []
    if getattr(args, 'accum_freq', 1) > 1:
        problems.append('--accum-freq > 1 (open_clip caches and re-runs the forward; the CODIS terms '
                        'would update the teacher and queues twice per step)')
    if getattr(args, 'siglip', False):
        problems.append('--siglip (the plugin adds its terms to open_clip\'s ClipLoss only)')
    if 'coca' in str(getattr(args, 'model', '')).lower():
        problems.append('CoCa models (the plugin adds its terms to open_clip\'s ClipLoss only)')
    if getattr(args, 'distill_model', None) is not None:
        problems.append('--distill-model (not combined with the CODIS terms)')
    if problems:
        raise SystemExit('vlp_codebook_openclip: not supported: ' + '; '.join(problems))


def codebook_model_kwargs(options: argparse.Namespace) -> dict:
    """``CodebookCLIP`` keyword arguments from the parsed options."""
    kwargs = dict(codebook_size=options.codebook_size, codebook_weight=options.codebook_weight,
                  plan_features=options.codebook_plan_features, intra=options.codis_intra,
                  momentum=options.codis_momentum, queue_size=options.queue_size or 0,
                  intra_weight=options.codis_intra_weight, plan_queue_size=options.codebook_plan_queue,
                  codebook_warmup_steps=options.codebook_warmup_steps)
    codebook_kwargs = {}
    if options.codebook_init_norm is not None:
        codebook_kwargs['codeword_init_norm'] = (None if options.codebook_init_norm == 'gaussian'
                                                 else options.codebook_init_norm)
    kwargs['codebook_kwargs'] = codebook_kwargs
    return kwargs
