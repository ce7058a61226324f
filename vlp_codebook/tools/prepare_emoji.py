"""Turn the emoji packages from npm into an ALBEF/LAVIS-format image-caption dataset.

``emoji-datasource-google`` gives 64 px PNGs and each emoji's Unicode name, short names and
category; ``openmoji`` its CLDR annotation and keyword tags (its own images are SVG only). They
are joined on the code point sequence, ignoring FE0F. Captions of one emoji (cleaned as ALBEF's,
deduplicated, skin-tone variants left out): its name, the annotation, readable short names, the
annotation with its tags, the name with its subcategory.

Output (``--out DIR``, ``image_root=DIR``): ``images/<code>.png`` (RGB on white), ``train.json``
(one entry per caption, :class:`~vlp_codebook.datasets.CaptionPretrainDataset`) and ``test.json``
(one entry per image, :class:`~vlp_codebook.datasets.CaptionRetrievalDataset`). The split is a
hash of the code points, stable across package versions and file order.

Usage::

    python -m vlp_codebook.tools.prepare_emoji --out data/emoji            # runs `npm pack`
    python -m vlp_codebook.tools.prepare_emoji --out data/emoji --size 32 \\
        --google-dir unpacked/emoji-datasource-google/package --openmoji-dir unpacked/openmoji/package
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from typing import Dict, List, Optional, Sequence

from PIL import Image

from vlp_codebook.datasets.caption_text import clean_caption
from vlp_codebook.datasets.image_loading import to_rgb

__all__ = ['DEFAULT_PACKAGES', 'npm_pack', 'emoji_key', 'emoji_captions', 'in_test_split', 'convert', 'main']

# The versions whose counts docs/data_and_evaluation.md reports.
DEFAULT_PACKAGES = ('emoji-datasource-google@16.0.0', 'openmoji@17.0.0')
_CODE_LIKE_SHORT_NAME = re.compile(r'^(flag-[a-z]{2}|u[0-9a-f]{4,}|[a-z]{1,2})$')


def npm_pack(specs: Sequence[str], work_dir: str) -> List[str]:
    """``npm pack`` each spec into ``work_dir``, untar it; the unpacked ``package`` directories.

    Raises:
        FileNotFoundError: ``npm`` is not on PATH.
        RuntimeError: ``npm pack`` failed (its output is in the message).
    """
    if shutil.which('npm') is None:
        raise FileNotFoundError('npm is not on PATH; install Node.js/npm, or unpack the packages yourself '
                                'and pass --google-dir and --openmoji-dir')
    os.makedirs(work_dir, exist_ok=True)
    package_dirs = []
    for spec in specs:
        done = subprocess.run(['npm', 'pack', spec], cwd=work_dir, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f'`npm pack {spec}` failed in {work_dir}:\n{done.stdout}\n{done.stderr}')
        tarball = os.path.join(work_dir, done.stdout.strip().splitlines()[-1])
        target = os.path.join(work_dir, spec.split('@')[0])
        shutil.rmtree(target, ignore_errors=True)
        with tarfile.open(tarball) as archive:
            if hasattr(tarfile, 'data_filter'):  # refuses links and paths leaving `target`
                archive.extractall(target, filter='data')
            else:  # pragma: no cover - Python without the extraction filters
                archive.extractall(target)
        package_dirs.append(os.path.join(target, 'package'))
    return package_dirs


def emoji_key(code_points: str) -> str:
    """A code point sequence like ``263A-FE0F`` as a join key: upper case, without FE0F."""
    return '-'.join(part for part in code_points.upper().split('-') if part and part != 'FE0F')


def _words(text: str) -> str:
    return clean_caption(text.replace('_', ' '), max_words=0)


def emoji_captions(google_entry: dict, openmoji_entry: Optional[dict] = None) -> List[str]:
    """The distinct cleaned captions of one emoji (see the module docstring), name first."""
    name = _words(google_entry.get('name') or '')
    annotation = _words((openmoji_entry or {}).get('annotation') or '') or name
    tags: List[str] = []
    for field in ('tags', 'openmoji_tags'):
        for tag in ((openmoji_entry or {}).get(field) or '').split(','):
            tag = _words(tag)
            if tag and tag not in tags:
                tags.append(tag)
    candidates = [name, annotation]
    candidates += [_words(short) for short in google_entry.get('short_names') or []
                   if not _CODE_LIKE_SHORT_NAME.match(short)]
    if tags:
        candidates.append(f'{annotation} {" ".join(tags)}')
    subcategory = _words(google_entry.get('subcategory') or '')
    if subcategory:
        candidates.append(f'{name or annotation} {subcategory}')
    captions: List[str] = []
    for caption in candidates:
        caption = clean_caption(caption, max_words=30)
        if caption and caption not in captions:
            captions.append(caption)
    return captions


def in_test_split(code_points: str, test_fraction: float) -> bool:
    """Whether an emoji goes to the test split: a stable hash of its key below ``test_fraction``."""
    digest = hashlib.blake2b(emoji_key(code_points).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') < test_fraction * 2 ** 64


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} not found: {os.path.abspath(path)}')
    with open(path, encoding='utf-8') as handle:
        return json.load(handle)


def convert(google_dir: str, openmoji_dir: Optional[str], out_dir: str, size: int = 64,
            test_fraction: float = 0.1) -> Dict[str, int]:
    """Write ``out_dir/{images/, train.json, test.json}`` from the unpacked
    ``emoji-datasource-google`` and (optional) ``openmoji`` packages; returns
    ``dict(emoji, missing_images, train_images, train_captions, test_images, test_captions)``."""
    if size < 1:
        raise ValueError(f'size must be positive, got {size}')
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}')
    google = _read_json(os.path.join(google_dir, 'emoji.json'), 'emoji-datasource emoji.json')
    openmoji = {}
    if openmoji_dir:
        for entry in _read_json(os.path.join(openmoji_dir, 'data', 'openmoji.json'), 'openmoji data/openmoji.json'):
            openmoji.setdefault(emoji_key(entry['hexcode']), entry)
    image_dir = os.path.join(google_dir, 'img', 'google', '64')
    os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
    train, test, missing = [], [], 0
    for entry in sorted(google, key=lambda e: (e.get('sort_order', 0), e['unified'])):
        source = os.path.join(image_dir, entry.get('image') or f"{entry['unified'].lower()}.png")
        if not entry.get('has_img_google', True) or not os.path.isfile(source):
            missing += 1
            continue
        captions = emoji_captions(entry, openmoji.get(emoji_key(entry['unified'])))
        if not captions:
            missing += 1
            continue
        image = f"images/{entry['unified'].lower()}.png"
        with Image.open(source) as picture:
            picture = to_rgb(picture)
            if picture.size != (size, size):
                picture = picture.resize((size, size), Image.BICUBIC)
            picture.save(os.path.join(out_dir, image))
        if in_test_split(entry['unified'], test_fraction):
            test.append(dict(image=image, caption=captions))
        else:
            image_id = train[-1]['image_id'] + 1 if train else 0
            train.extend(dict(image=image, caption=caption, image_id=image_id) for caption in captions)
    if not train and not test:
        raise RuntimeError(f'no emoji image found under {os.path.abspath(image_dir)}')
    for name, data in (('train.json', train), ('test.json', test)):
        with open(os.path.join(out_dir, name), 'w', encoding='utf-8') as handle:
            json.dump(data, handle, indent=0, ensure_ascii=False)
    return dict(emoji=len(google), missing_images=missing,
                train_images=len({item['image'] for item in train}), train_captions=len(train),
                test_images=len(test), test_captions=sum(len(item['caption']) for item in test))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='output directory (e.g. data/emoji)')
    parser.add_argument('--size', type=int, default=64, help='image side in pixels (default 64)')
    parser.add_argument('--test-fraction', type=float, default=0.1, help='share of emoji in test.json')
    parser.add_argument('--google-dir', help='unpacked emoji-datasource-google package (skips npm)')
    parser.add_argument('--openmoji-dir', help='unpacked openmoji package (skips npm)')
    parser.add_argument('--work-dir', help='where `npm pack` runs (default OUT/_npm)')
    parser.add_argument('--packages', nargs=2, default=DEFAULT_PACKAGES, metavar=('GOOGLE_SPEC', 'OPENMOJI_SPEC'),
                        help=f'npm package specs (default {" ".join(DEFAULT_PACKAGES)})')
    args = parser.parse_args(argv)
    google_dir, openmoji_dir = args.google_dir, args.openmoji_dir
    if google_dir is None or openmoji_dir is None:
        packed = npm_pack(args.packages, args.work_dir or os.path.join(args.out, '_npm'))
        google_dir = google_dir or packed[0]
        openmoji_dir = openmoji_dir or packed[1]
    counts = convert(google_dir, openmoji_dir, args.out, args.size, args.test_fraction)
    print(json.dumps(counts))
    return counts


if __name__ == '__main__':
    main()
