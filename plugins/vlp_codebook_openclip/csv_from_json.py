"""ALBEF/LAVIS JSON captions -> open_clip's CSV: ``python -m vlp_codebook_openclip.csv_from_json``.

open_clip_train reads image-caption pairs from a CSV (``--dataset-type csv``); this project's data
(and ALBEF's, LAVIS's) is a JSON list of ``{"image": path, "caption": str or [str, ...]}``. One
row per caption, tab-separated columns ``filepath`` (absolute) and ``title`` (open_clip's default
``--csv-img-key`` / ``--csv-caption-key``); use ``--csv-separator $'\\t'`` when training::

    python -m vlp_codebook_openclip.csv_from_json data/emoji/train.json data/emoji/train.csv
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import sys
from typing import Iterable, Mapping, Optional, Sequence

__all__ = ['write_csv', 'main']


def write_csv(entries: Iterable[Mapping], image_root: str, path: str) -> int:
    """Write the rows of ``entries`` (``image`` relative to ``image_root``, ``caption`` a string or
    a list of strings); returns the number of rows. Whitespace in captions (tabs, newlines) is
    folded to single spaces so that every row stays one CSV line."""
    rows = 0
    with open(path, 'w', encoding='utf-8') as handle:
        handle.write('filepath\ttitle\n')
        for index, entry in enumerate(entries):
            if 'image' not in entry or 'caption' not in entry:
                raise ValueError(f'entry {index} needs "image" and "caption", got keys {sorted(entry)}')
            captions = entry['caption'] if isinstance(entry['caption'], list) else [entry['caption']]
            image = osp.abspath(osp.join(image_root, entry['image']))
            for caption in captions:
                handle.write(f"{image}\t{' '.join(str(caption).split())}\n")
                rows += 1
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m vlp_codebook_openclip.csv_from_json',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('annotations', help='JSON list of {"image", "caption"}')
    parser.add_argument('output', help='the CSV to write')
    parser.add_argument('--image-root', default=None, help="images' folder (default: the JSON's folder)")
    parser.add_argument('--verbose', action='store_true', help='print the traceback of an error')
    args = parser.parse_args(argv)
    if not osp.isfile(args.annotations):
        raise FileNotFoundError(f'annotations {args.annotations} do not exist')
    with open(args.annotations, encoding='utf-8') as handle:
        entries = json.load(handle)
    if not isinstance(entries, list):
        raise ValueError(f'{args.annotations} must hold a JSON list of entries, got {type(entries).__name__}')
    rows = write_csv(entries, args.image_root or osp.dirname(osp.abspath(args.annotations)), args.output)
    print(f'wrote {args.output}: {rows} image-caption rows')
    return 0


if __name__ == '__main__':
    from vlp_codebook.tools.cli import prepare_process, run_main
    prepare_process()
    run_main(main, sys.argv[1:], prog='vlp_codebook_openclip.csv_from_json')
