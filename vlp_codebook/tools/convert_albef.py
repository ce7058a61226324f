"""Convert an ALBEF checkpoint into CODIS's parameter names, to start CODIS from a pretrained ALBEF.

Usage::

    python -m vlp_codebook.tools.convert_albef SRC DST [--config CONFIG [--cfg-options KEY=VALUE ...]]
        [--trust-checkpoint]
    mim run vlp_codebook convert_albef SRC DST --config codis_base_pretrain

``SRC`` is a LOCAL ALBEF checkpoint (the ALBEF repository's ``ALBEF_4M.pth``, or a LAVIS
``albef_*``/``codis_*`` model's saved ``state_dict()``), loaded as data (``weights_only=True``; see
docs/security.md for ``--trust-checkpoint``). ``DST`` gets ``{'state_dict': ...,
'meta': ...}``, loadable with ``load_from=DST`` (the codebook and queues start fresh: mmengine
lists them as missing keys). With ``--config`` the converted tensors are checked against the
model that config builds -- every tensor must exist there with the same shape -- and the
position embeddings are resized to its image size. See :mod:`vlp_codebook.models.albef_weights`.
"""
from __future__ import annotations

if __name__ == '__main__':  # before torch is imported: OpenMP wait policy, warning filters
    from vlp_codebook.tools.cli import prepare_process

    prepare_process()

import argparse
import os
import os.path as osp
from typing import List, Optional

import torch

from vlp_codebook.tools.train import add_cfg_options

__all__ = ['parse_args', 'main']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='vlp_codebook.tools.convert_albef', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='ALBEF checkpoint (local file)')
    parser.add_argument('dst', help='output file for the CODIS state dict')
    parser.add_argument('--config', help='CODIS config (path or shipped name) to check the result against')
    add_cfg_options(parser, 'model.image_encoder.image_size=384')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='unpickle SRC without the allow-list (weights_only=False): only for a file you trust')
    return parser.parse_args(argv)


def check_against_model(state, model) -> List[str]:
    """Raise if a converted tensor has no place in ``model`` or another shape; list what stays fresh."""
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise ValueError(f'{len(unexpected)} converted tensor(s) have no place in the model built from the config '
                         f'(fewer layers than the checkpoint, or a head the config leaves out?): {unexpected[:8]}')
    bad = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(state) if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f'converted tensors differ in shape from the model built from the config '
                         f'(name, checkpoint, model): {bad[:8]}')
    return sorted(k for k in own if k not in state)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    from vlp_codebook.models.albef_weights import albef_to_codis_state_dict
    from vlp_codebook.engine.checkpoint import checkpoint_loading
    from vlp_codebook.models.encoders.pretrained import read_state_dict

    with checkpoint_loading(trust=args.trust_checkpoint or None):  # as data unless --trust-checkpoint
        source = read_state_dict(args.src, arg_name='src')
    model = None
    image_size = patch_size = None
    if args.config:
        from vlp_codebook.engine.config import load_config
        from vlp_codebook.registry import MODELS
        cfg = load_config(args.config, cfg_options=args.cfg_options)
        model = MODELS.build(cfg.model)
        vit = model.image_tower.encoder
        image_size, patch_size = vit.image_size, vit.patch_size
    state, notes = albef_to_codis_state_dict(source, image_size=image_size, patch_size=patch_size)
    fresh = check_against_model(state, model) if model is not None else None
    os.makedirs(osp.dirname(osp.abspath(args.dst)), exist_ok=True)
    meta = dict(converted_from=osp.abspath(args.src), notes=notes)
    torch.save(dict(state_dict=state, meta=meta), args.dst)
    print(f'{len(state)} tensors from {args.src} -> {args.dst}')
    for note in notes:
        print(f'  {note}')
    if fresh is not None:
        print(f'  not from the checkpoint ({len(fresh)} tensors, initialised by the model): '
              + ', '.join(sorted({k.split('.')[0] for k in fresh})))
    return dict(state_dict=state, notes=notes, fresh=fresh)


if __name__ == '__main__':
    import sys

    from vlp_codebook.tools.cli import run_main

    run_main(main, sys.argv[1:], prog='vlp_codebook.tools.convert_albef')
