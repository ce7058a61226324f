"""Image-caption datasets for the ALBEF / LAVIS JSON annotation format.

Training files are a JSON list of ``{"image": path, "caption": str | [str, ...], "image_id"?: any}``;
retrieval evaluation files (ALBEF ``coco_test.json``, LAVIS ``*_test.json``) one entry per image
with a list of captions. Image paths are joined to ``image_root``. Captions are cleaned
(:func:`~vlp_codebook.datasets.caption_text.clean_caption`) when the dataset is built, so a
caption that cleans to nothing is reported at once with its entry index. Batch with
``collate_fn=dict(type='vlp_codebook.vlp_collate')`` (scoped: the Runner looks collate functions
up in mmengine's root registry).

Example (an mmengine dataloader config)::

    train_dataloader = dict(
        batch_size=64, num_workers=4,
        sampler=dict(type='DefaultSampler', shuffle=True),
        collate_fn=dict(type='vlp_codebook.vlp_collate'),
        dataset=dict(type='CaptionPretrainDataset', ann_file='data/emoji/train.json',
                     image_root='data/emoji', image_size=64, horizontal_flip_prob=0.5))
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from vlp_codebook.datasets.caption_text import clean_caption, swap_left_right
from vlp_codebook.datasets.image_loading import check_crop_scale, load_image
from vlp_codebook.datasets.rand_augment import RandAugment
from vlp_codebook.registry import DATASETS

__all__ = ['load_annotations', 'CaptionPretrainDataset', 'CaptionRetrievalDataset']

AnnFiles = Union[str, Sequence[str]]


def load_annotations(ann_file: AnnFiles) -> List[Tuple[str, int, dict]]:
    """Entries of one or several JSON annotation files as ``(file, index in file, entry)``; a
    missing, non-UTF-8 or non-JSON file, or one that is not a list of objects, raises naming it."""
    files = [ann_file] if isinstance(ann_file, (str, os.PathLike)) else list(ann_file)
    if not files:
        raise ValueError('ann_file is an empty list; give at least one JSON annotation file')
    entries = []
    for path in files:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'annotation file not found: {os.path.abspath(path)}')
        with open(path, 'rb') as handle:
            raw = handle.read()
        try:
            text = raw.decode('utf-8-sig')   # UTF-8 with or without a byte-order mark
        except UnicodeDecodeError as error:
            line = raw.count(b'\n', 0, error.start) + 1
            raise ValueError(
                f'annotation file {os.path.abspath(path)} is not UTF-8: byte 0x{raw[error.start]:02x} at offset '
                f'{error.start} (line {line}). JSON annotation files must be UTF-8; if this one is Latin-1 / '
                f'Windows-1252, re-save it, e.g. iconv -f latin1 -t utf-8 IN > OUT') from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f'annotation file {os.path.abspath(path)} is not valid JSON: {error}') from error
        if not isinstance(data, list):
            raise TypeError(f'annotation file {os.path.abspath(path)} must hold a JSON list of entries '
                            f'like {{"image": ..., "caption": ...}}, got a JSON {type(data).__name__}')
        for index, entry in enumerate(data):
            if not isinstance(entry, dict):
                raise TypeError(f'entry {index} of {path} must be a JSON object with "image" and '
                                f'"caption", got {type(entry).__name__}: {entry!r:.80}')
            entries.append((path, index, entry))
    return entries


def _field(path: str, index: int, entry: dict, name: str) -> Any:
    if name not in entry:
        raise KeyError(f'entry {index} of {path} has no "{name}" field (it has: {sorted(entry)})')
    return entry[name]


def _captions(path: str, index: int, entry: dict, max_words: int) -> List[str]:
    raw = _field(path, index, entry, 'caption')
    raw_list = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw_list, list) or not all(isinstance(c, str) for c in raw_list):
        raise TypeError(f'entry {index} of {path}: "caption" must be a str or a list of str, got {raw!r:.80}')
    if not raw_list:
        raise ValueError(f'entry {index} of {path}: "caption" is an empty list')
    try:
        captions = [clean_caption(c, max_words) for c in raw_list]
    except ValueError as error:   # a lone surrogate
        raise ValueError(f'entry {index} of {path}: {error}') from None
    for caption, original in zip(captions, raw_list):
        if not caption:
            raise ValueError(f'entry {index} of {path}: caption {original!r} is empty after cleaning')
    return captions


def _image_path(path: str, index: int, entry: dict, image_root: str) -> str:
    image = _field(path, index, entry, 'image')
    if not isinstance(image, str) or not image:
        raise TypeError(f'entry {index} of {path}: "image" must be a non-empty path string, got {image!r}')
    return os.path.join(image_root, image)


def _check_files(paths: Sequence[str]) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'image file not found: {os.path.abspath(path)}')


class _CaptionImages(Dataset):
    """Shared image handling: root, size, optional crop and flip augmentation."""

    def __init__(self, image_root: str, image_size: int, horizontal_flip_prob: float,
                 crop_scale: Optional[Tuple[float, float]] = None, rand_augment: Optional[dict] = None):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f'image_size must be a positive int, got {image_size!r}')
        if not 0.0 <= horizontal_flip_prob <= 1.0:
            raise ValueError(f'horizontal_flip_prob must be in [0, 1], got {horizontal_flip_prob}')
        self.image_root = image_root
        self.image_size = image_size
        self.horizontal_flip_prob = horizontal_flip_prob
        self.crop_scale = check_crop_scale(crop_scale)
        if rand_augment is not None and not isinstance(rand_augment, dict):
            raise TypeError(f'rand_augment must be a dict of RandAugment arguments (e.g. dict(num_ops=2, '
                            f'magnitude=7)) or None, got {type(rand_augment).__name__}')
        self.rand_augment = RandAugment(**rand_augment) if rand_augment is not None else None
        self.metainfo: Dict[str, Any] = {}

    def _load(self, path: str) -> torch.Tensor:
        return load_image(path, self.image_size, crop_scale=self.crop_scale, augment=self.rand_augment)

    def _maybe_flip(self, image: torch.Tensor, text: str) -> Tuple[torch.Tensor, str]:
        # Python's global RNG: mmengine seeds it per worker. With probability 0 nothing random runs.
        if self.horizontal_flip_prob > 0 and random.random() < self.horizontal_flip_prob:
            return image.flip(-1), swap_left_right(text)
        return image, text


@DATASETS.register_module()
class CaptionPretrainDataset(_CaptionImages):
    """One sample per (image, caption) pair of ALBEF/LAVIS JSON annotation files.

    Args:
        ann_file: a JSON file or a list of them; image_root: where relative ``image`` paths are.
        image_size: output side length (square).
        max_words: captions are cut to this many words after cleaning (ALBEF: 30).
        horizontal_flip_prob: random horizontal flip, which also swaps "left" and "right" in the
            caption (0, default: deterministic items).
        crop_scale: ``(min, max)`` area fraction of a random resized crop (ALBEF: (0.2, 1)
            pretraining, (0.5, 1) fine-tuning); None: the whole image.
        rand_augment: :class:`~vlp_codebook.datasets.rand_augment.RandAugment` arguments (ALBEF:
            ``dict(num_ops=2, magnitude=7)``), applied after the crop; None: off.
        check_images: ``stat`` every image file at construction (off: reported when read).

    Item: ``dict(image=(3, image_size, image_size) float32 in [0, 1], text=str, image_id=int)``.
    ``image_id`` is the annotation's ``image_id`` when every entry has an ``int`` one; otherwise
    (string ids, or none) the images are numbered 0, 1, ... in order of first appearance, by
    ``image_id`` where given, else by image path — so all captions of one image share one id.
    """

    def __init__(self, ann_file: AnnFiles, image_root: str = '', image_size: int = 224,
                 max_words: int = 30, horizontal_flip_prob: float = 0.0, check_images: bool = False,
                 crop_scale: Optional[Tuple[float, float]] = None, rand_augment: Optional[dict] = None):
        super().__init__(image_root, image_size, horizontal_flip_prob, crop_scale, rand_augment)
        self.ann_file = ann_file
        self.max_words = max_words
        entries = load_annotations(ann_file)
        keys: List[Hashable] = []
        self.samples: List[Tuple[str, str, Hashable]] = []  # (image path, caption, id key)
        for path, index, entry in entries:
            image = _image_path(path, index, entry, image_root)
            key = entry.get('image_id', image)
            if not isinstance(key, Hashable) or isinstance(key, (bool, float)):
                raise TypeError(f'entry {index} of {path}: "image_id" must be an int or a str, got {key!r}')
            keys.append(key)
            for caption in _captions(path, index, entry, max_words):
                self.samples.append((image, caption, key))
        if all(isinstance(e.get('image_id'), int) for _, _, e in entries):
            self._id_of = {key: key for key in keys}
        else:
            self._id_of = {}
            for key in keys:
                self._id_of.setdefault(key, len(self._id_of))
        if check_images:
            _check_files(sorted({image for image, _, _ in self.samples}))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image_path, text, key = self.samples[index]
        image, text = self._maybe_flip(self._load(image_path), text)
        return dict(image=image, text=text, image_id=self._id_of[key])


@DATASETS.register_module()
class CaptionRetrievalDataset(_CaptionImages):
    """One item per image of an ALBEF/LAVIS retrieval file (``{"image", "caption": [...]}``).

    Args:
        ann_file: a JSON file (or a list of them) with one entry per image.
        image_root, image_size, max_words, check_images: as :class:`CaptionPretrainDataset`.

    Item: ``dict(image=(3, image_size, image_size) float32, texts=list[str], image_id=int)`` where
    ``image_id`` is the image's index (entry order over all files), as ALBEF's ``re_eval_dataset``.

    Attributes:
        text: all cleaned captions, numbered in file order.
        img2txt: ``img2txt[i]`` = indices into ``text`` of image ``i``'s captions.
        txt2img: ``txt2img[j]`` = index of the image caption ``j`` describes.
    """

    def __init__(self, ann_file: AnnFiles, image_root: str = '', image_size: int = 224,
                 max_words: int = 30, check_images: bool = False):
        super().__init__(image_root, image_size, horizontal_flip_prob=0.0)
        self.ann_file = ann_file
        self.max_words = max_words
        self.images: List[str] = []
        self.captions: List[List[str]] = []
        self.text: List[str] = []
        self.img2txt: Dict[int, List[int]] = {}
        self.txt2img: Dict[int, int] = {}
        for image_index, (path, index, entry) in enumerate(load_annotations(ann_file)):
            self.images.append(_image_path(path, index, entry, image_root))
            captions = _captions(path, index, entry, max_words)
            self.captions.append(captions)
            self.img2txt[image_index] = []
            for caption in captions:
                self.img2txt[image_index].append(len(self.text))
                self.txt2img[len(self.text)] = image_index
                self.text.append(caption)
        if check_images:
            _check_files(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return dict(image=self._load(self.images[index]), texts=list(self.captions[index]), image_id=index)
