"""Write a demo image and its caption: a scene of the embedded synthetic-shapes test split (the
data the demo config trains and validates on), for the Grad-CAM tool.

Usage::

    python -m vlp_codebook.tools.make_sample --out sample/ [--index 3] [--image-size 32]
    mim run vlp_codebook make_sample --out sample/

Writes ``sample.png`` (the scene at the model's resolution, exactly as the dataset renders it),
``caption.txt`` (its full description, "a small red circle left of a large blue square") and
prints the Grad-CAM command for it. Test-split scenes are never training images.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
from typing import List, Optional

__all__ = ['parse_args', 'main']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='vlp_codebook.tools.make_sample', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='sample', help='output folder (default: ./sample)')
    parser.add_argument('--index', type=int, default=0, help='scene index in the test split (default 0)')
    parser.add_argument('--seed', type=int, default=0, help='dataset seed (default 0, as the demo)')
    parser.add_argument('--image-size', type=int, default=32, help='side in pixels (default 32, as the demo)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    from vlp_codebook.datasets.synthetic_shapes import SyntheticShapesDataset, render_scene, scene_captions
    if args.index < 0:
        raise ValueError(f'--index must be >= 0, got {args.index}')
    dataset = SyntheticShapesDataset(num_images=args.index + 1, image_size=args.image_size, split='test',
                                     seed=args.seed, captions_per_image=1)
    scene = dataset.scenes[args.index]
    caption = scene_captions(scene)[0]      # 'a <size> <color> <shape> <relation> a <size> <color> <shape>'
    os.makedirs(args.out, exist_ok=True)
    image_path, caption_path = osp.join(args.out, 'sample.png'), osp.join(args.out, 'caption.txt')
    render_scene(scene, args.image_size).save(image_path)
    with open(caption_path, 'w', encoding='utf-8') as handle:
        handle.write(caption + '\n')
    print(f'wrote {image_path} and {caption_path}: "{caption}"\n'
          f'Grad-CAM: python -m vlp_codebook.tools.gradcam configs/codis_demo.py work_dirs/codis_demo/epoch_10.pth '
          f'{image_path} "{caption}" --out gradcam/')
    return dict(image=image_path, caption=caption, scene=scene)


if __name__ == '__main__':
    import sys

    from vlp_codebook.tools.cli import run_main

    run_main(main, sys.argv[1:], prog='vlp_codebook.tools.make_sample')
