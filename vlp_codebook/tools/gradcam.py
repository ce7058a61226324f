"""Grad-CAM of the ITM score per word of a caption, as heat maps over the image (the paper's
qualitative figure).

Usage::

    python -m vlp_codebook.tools.gradcam CONFIG CHECKPOINT IMAGE "a caption" [--out DIR]
        [--layer N] [--cfg-options KEY=VALUE ...]
    mim run vlp_codebook gradcam CONFIG CHECKPOINT IMAGE "a caption" --out DIR

Writes one PNG per token (``00_[CLS].png`` is the whole caption, then ``01_<word>.png``...), each
the image upsampled to about ``--size`` pixels with the token's map on top (opacity growing with
the map, so the image keeps its colours where the map is low), and ``grid.png``: the image and
every token's map in a grid, each panel titled with its token. Prints the ITM logit. See
:mod:`vlp_codebook.analysis.gradcam` and :mod:`vlp_codebook.analysis.gradcam_figure`; a demo image
and caption come from ``python -m vlp_codebook.tools.make_sample``.
"""
from __future__ import annotations

if __name__ == '__main__':  # before torch is imported: OpenMP wait policy, warning filters
    from vlp_codebook.tools.cli import prepare_process

    prepare_process()

import argparse
import os
import os.path as osp
import re
from typing import List, Optional

from vlp_codebook.analysis.gradcam_figure import display_scale, gradcam_grid, overlay
from vlp_codebook.tools.train import add_cfg_options, add_checkpoint_args, add_nonfinite_arg

__all__ = ['parse_args', 'main', 'overlay']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='vlp_codebook.tools.gradcam', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file path, or the name of a shipped config')
    parser.add_argument('checkpoint', help='checkpoint file (.pth written by the train tool), loaded as data')
    parser.add_argument('image', help='image file')
    parser.add_argument('caption', help='the caption to explain')
    parser.add_argument('--out', default='gradcam', help='output directory (default: ./gradcam)')
    parser.add_argument('--layer', type=int, default=None,
                        help='fusion layer (default: the third of six as ALBEF, the first of two; never the last)')
    parser.add_argument('--size', type=int, default=224, help='displayed image side in pixels (default 224)')
    add_cfg_options(parser, 'model.fusion_encoder.num_layers=6')
    add_checkpoint_args(parser)   # --trust-checkpoint, --allow-missing-weights (docs/security.md)
    add_nonfinite_arg(parser)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    from vlp_codebook.engine.checkpoint import checkpoint_loading
    from vlp_codebook.engine.checkpoint_coverage import load_model_weights

    from vlp_codebook.analysis.gradcam import default_layer, itm_gradcam
    from vlp_codebook.datasets.image_loading import load_image
    from vlp_codebook.engine.config import load_config
    from vlp_codebook.registry import MODELS

    cfg = load_config(args.config, cfg_options=args.cfg_options)
    with checkpoint_loading(trust=args.trust_checkpoint or None):   # encoders' pretrained= too
        model = MODELS.build(cfg.model)
    # as data (weights_only=True); refuses a checkpoint that leaves parameters random
    load_model_weights(model, args.checkpoint, trust=args.trust_checkpoint or None,
                       allow_missing=args.allow_missing_weights, allow_nonfinite=args.allow_nonfinite)
    model.eval()
    image = load_image(args.image, model.image_tower.encoder.image_size)
    data = model.data_preprocessor({'images': image[None], 'texts': [args.caption]}, False)
    layers = len(model.fusion_encoder.layer)
    layer = default_layer(layers) if args.layer is None else args.layer
    cams, logit = itm_gradcam(model, data['images'], data['input_ids'], data['attention_mask'], layer=layer)
    if layer % layers == layers - 1:
        print(f'note: layer {layers - 1} is the last fusion layer; only [CLS] has a map there (the ITM head '
              'reads [CLS] alone and no later layer carries the words into it)')
    tokens = model.data_preprocessor.tokenizer.convert_ids_to_tokens(data['input_ids'][0].tolist())
    os.makedirs(args.out, exist_ok=True)
    scale = display_scale(image.shape[-1], args.size)
    shown, files = [], []
    for index, token in enumerate(tokens):
        if not data['attention_mask'][0, index]:
            continue
        safe = re.sub(r'[^A-Za-z0-9_#\[\]-]', '_', token)
        name = f'{index:02d}_{safe}.png'
        overlay(image, cams[0, index], scale).save(osp.join(args.out, name))
        shown.append(index)
        files.append(name)
    labels = gradcam_grid(image, cams[0, shown], [tokens[i] for i in shown], osp.join(args.out, 'grid.png'),
                          title=f'"{args.caption}"   ITM logit {logit[0].item():.2f}, fusion layer index {layer % layers} '
                                f'of {layers}', scale=scale)
    print(f'ITM logit {logit[0].item():.3f}; {len(files)} maps in {args.out}: {", ".join(files)} and grid.png')
    return dict(cams=cams[0], tokens=tokens, logit=logit[0].item(), files=files, grid_labels=labels, layer=layer)


if __name__ == '__main__':
    import sys

    from vlp_codebook.tools.cli import run_main

    run_main(main, sys.argv[1:], prog='vlp_codebook.tools.gradcam')
