"""Strip the CODIS parts from a checkpoint, for plain open_clip: ``python -m vlp_codebook_openclip.export``.

A checkpoint written by ``vlp_codebook_openclip.train`` holds open_clip's model under ``clip.``
plus the codebook, teacher and queues. The exported file is open_clip's own layout
(``{'state_dict': {name: tensor}}``, the model's keys without prefix), so users ship it without
this package::

    python -m vlp_codebook_openclip.export logs/run/checkpoints/epoch_10.pt model.pt
    python -c "import open_clip; open_clip.create_model_and_transforms('ViT-B-32', pretrained='model.pt')"

The input is read against the schema of :mod:`vlp_codebook.checkpoint_io`; the output is written to a temporary
file in the same directory and renamed into place, so an interrupted export leaves no half file.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import tempfile
from typing import Dict, Mapping, Optional, Sequence

import torch

from vlp_codebook.checkpoint_io import read_checkpoint

__all__ = ['strip_codis', 'export', 'main']


def strip_codis(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """open_clip's model keys of a ``CodebookCLIP`` state dict (``clip.`` prefix removed, a DDP
    ``module.`` prefix too); every CODIS key (codebook, teacher, queues, intra loss) dropped."""
    out = {}
    for key, value in state_dict.items():
        name = key[len('module.'):] if key.startswith('module.') else key
        if name.startswith('clip.'):
            out[name[len('clip.'):]] = value
    if not out:
        raise ValueError('no clip.* keys: this is not a checkpoint of vlp_codebook_openclip '
                         f'(first keys: {list(state_dict)[:3]})')
    return out


def export(src: str, dst: str) -> int:
    """Write the plain open_clip checkpoint of ``src`` to ``dst``; returns the number of keys."""
    if not osp.isfile(src):
        raise FileNotFoundError(f'checkpoint {src} does not exist')
    checkpoint = read_checkpoint(src, map_location='cpu')
    state_dict = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, Mapping):
        raise ValueError(f'{src} holds no state dict (got {type(checkpoint).__name__})')
    plain = strip_codis(state_dict)
    directory = osp.dirname(osp.abspath(dst))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix='.export-', suffix='.pt', dir=directory)
    try:
        with os.fdopen(handle, 'wb') as stream:
            torch.save({'state_dict': plain}, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, dst)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return len(plain)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m vlp_codebook_openclip.export', description=__doc__.split('\n\n')[0])
    parser.add_argument('checkpoint', help='a checkpoint written by vlp_codebook_openclip.train')
    parser.add_argument('output', help='where to write the plain open_clip checkpoint')
    parser.add_argument('--verbose', action='store_true', help='print the traceback of an error')
    args = parser.parse_args(argv)
    count = export(args.checkpoint, args.output)
    print(f'wrote {args.output}: {count} open_clip tensors (CODIS keys dropped)')
    return 0


if __name__ == '__main__':
    from vlp_codebook.tools.cli import prepare_process, run_main
    prepare_process()
    run_main(main, sys.argv[1:], prog='vlp_codebook_openclip.export')
