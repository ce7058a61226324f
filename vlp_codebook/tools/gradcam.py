"""Grad-CAM of the ITM score per word of a caption, as heat maps over the image (the paper's
qualitative figure).

Usage::

    python -m vlp_codebook.tools.gradcam CONFIG CHECKPOINT IMAGE "a caption" [--out DIR]
        [--layer N] [--cfg-options KEY=VALUE ...]
    mim run vlp_codebook gradcam CONFIG CHECKPOINT IMAGE "a caption" --out DIR

Writes one PNG per token (``00_[CLS].png`` is the whole caption, then ``01_<word>.png``...) and
``grid.png`` with all of them side by side, each the image with the token's map (upsampled,
scaled to [0, 1]) blended on top; prints the ITM logit. See :mod:`vlp_codebook.analysis.gradcam`.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import re
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from vlp_codebook.tools.train import add_cfg_options, add_checkpoint_args

__all__ = ['parse_args', 'main', 'overlay']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='vlp_codebook.tools.gradcam', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file path, or the name of a shipped config')
    parser.add_argument('checkpoint', help='checkpoint file (.pth written by the train tool), loaded as data')
    parser.add_argument('image', help='image file')
    parser.add_argument('caption', help='the caption to explain')
    parser.add_argument('--out', default='gradcam', help='output directory (default: ./gradcam)')
    parser.add_argument('--layer', type=int, default=None, help='fusion layer (default: the third, as ALBEF)')
    add_cfg_options(parser, 'model.fusion_encoder.num_layers=6')
    add_checkpoint_args(parser)   # --trust-checkpoint, --allow-missing-weights (docs/security.md)
    return parser.parse_args(argv)


def _jet(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours, blue (0) through green to red (1)."""
    x = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def overlay(image: torch.Tensor, cam: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """``image`` (3, H, W) in [0, 1] with ``cam`` (h, w) upsampled, scaled to [0, 1], blended on top."""
    heat = torch.nn.functional.interpolate(cam[None, None].float(), size=image.shape[-2:], mode='bilinear',
                                           align_corners=False)[0, 0]
    heat = heat - heat.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    base = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.float32)
    blended = (1 - alpha) * base + alpha * _jet(heat.numpy()).astype(np.float32)
    return Image.fromarray(blended.round().astype(np.uint8))


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
                       allow_missing=args.allow_missing_weights)
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
    panels, files = [], []
    for index, token in enumerate(tokens):
        if not data['attention_mask'][0, index]:
            continue
        panel = overlay(image, cams[0, index])
        safe = re.sub(r'[^A-Za-z0-9_#\[\]-]', '_', token)
        name = f'{index:02d}_{safe}.png'
        panel.save(osp.join(args.out, name))
        panels.append(panel)
        files.append(name)
    grid = Image.new('RGB', (sum(p.width for p in panels), panels[0].height))
    for i, panel in enumerate(panels):
        grid.paste(panel, (i * panel.width, 0))
    grid.save(osp.join(args.out, 'grid.png'))
    print(f'ITM logit {logit[0].item():.3f}; {len(files)} maps in {args.out}: {", ".join(files)}')
    return dict(cams=cams[0], tokens=tokens, logit=logit[0].item(), files=files)


if __name__ == '__main__':
    main()
