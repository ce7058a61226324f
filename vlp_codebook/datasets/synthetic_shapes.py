"""An embedded image-caption dataset: rendered two-object scenes with compositional captions.

Nothing is downloaded. Two objects (size, color, shape; the colors differ) sit side by side or
one over the other, and every caption is a true paraphrase of the scene, e.g.
``there is a large blue square to the right of a small red circle``.

Scene ``i`` is a pure function of ``(seed, split, i)`` (``numpy.random.default_rng``, PIL without
anti-aliasing). Its split is a stable hash of its full description (1 in 5 to ``test``), and the
generator redraws until the scene is of its own split, so no train image can be a test image.
``split='train'`` items are as :class:`CaptionPretrainDataset`'s, ``split='test'`` as
:class:`CaptionRetrievalDataset`'s (with ``text``, ``img2txt``, ``txt2img``).
:meth:`SyntheticShapesDataset.write_vocabulary` writes the words for an offline BERT tokenizer.

Example::

    >>> train = SyntheticShapesDataset(num_images=200, image_size=32, split='train', seed=0)
    >>> item = train[0]
    >>> item['image'].shape, item['text']
    (torch.Size([3, 32, 32]), 'there is a small green triangle below a small blue circle')
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from vlp_codebook.datasets.image_loading import pil_to_tensor
from vlp_codebook.registry import DATASETS

__all__ = ['SyntheticShapesDataset', 'ShapeObject', 'Scene', 'COLORS', 'SHAPES', 'SIZES',
           'SPECIAL_TOKENS', 'render_scene', 'scene_captions']

COLORS: Dict[str, Tuple[int, int, int]] = {
    'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (50, 90, 230), 'yellow': (230, 210, 40)}
SHAPES = ('circle', 'square', 'triangle')
# Object side length as a fraction of the image side.
SIZES: Dict[str, float] = {'small': 0.28, 'large': 0.44}
BACKGROUND = (24, 24, 24)
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
# (relation of the first-drawn object to the second, its converse), per axis, with paraphrases.
_RELATIONS = {
    'horizontal': (('left of', 'to the left of'), ('right of', 'to the right of')),
    'vertical': (('above', 'over'), ('below', 'under')),
}
_TEMPLATE_WORDS = ('a', 'there', 'is', 'and', 'picture', 'of')
_SPLITS = {'train': 0, 'test': 1}
_TEST_SHARE = 5  # one scene in five belongs to the test split


class ShapeObject(NamedTuple):
    size: str
    color: str
    shape: str
    box: Tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive pixel bounds

    def describe(self, with_size: bool = True, with_color: bool = True) -> str:
        words = ([self.size] if with_size else []) + ([self.color] if with_color else []) + [self.shape]
        return ' '.join(words)


class Scene(NamedTuple):
    axis: str            # 'horizontal' (first object on the left) or 'vertical' (first on top)
    first: ShapeObject   # left or top object
    second: ShapeObject  # right or bottom object


def _draw_object(rng: np.random.Generator, image_size: int, axis: str, slot: int,
                 color: str, used_size: Optional[str] = None) -> ShapeObject:
    size = str(rng.choice(list(SIZES)))
    shape = str(rng.choice(SHAPES))
    side = max(3, int(round(SIZES[size] * image_size)))
    half = image_size // 2
    # Along the relation axis the object stays inside its half; across it, near the centre line,
    # so that a horizontal scene does not also read as "above"/"below".
    along_low, along_high = slot * half, slot * half + half - side
    band = max(0, int(0.08 * image_size))
    across_low = max(0, half - side // 2 - band)
    across_high = min(image_size - side, half - side // 2 + band)
    along = int(rng.integers(along_low, max(along_low, along_high) + 1))
    across = int(rng.integers(across_low, max(across_low, across_high) + 1))
    x0, y0 = (along, across) if axis == 'horizontal' else (across, along)
    return ShapeObject(size, color, shape, (x0, y0, x0 + side - 1, y0 + side - 1))


def _random_scene(rng: np.random.Generator, image_size: int) -> Scene:
    axis = str(rng.choice(list(_RELATIONS)))
    color_a, color_b = rng.choice(list(COLORS), size=2, replace=False)
    return Scene(axis, _draw_object(rng, image_size, axis, 0, str(color_a)),
                 _draw_object(rng, image_size, axis, 1, str(color_b)))


def _split_of(scene: Scene) -> str:
    digest = hashlib.blake2b(repr(tuple(scene)).encode(), digest_size=8).digest()
    return 'test' if int.from_bytes(digest, 'little') % _TEST_SHARE == 0 else 'train'


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """The scene as an RGB PIL image, drawn without anti-aliasing."""
    image = Image.new('RGB', (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in (scene.first, scene.second):
        x0, y0, x1, y1 = obj.box
        fill = COLORS[obj.color]
        if obj.shape == 'circle':
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == 'square':
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # an upward triangle
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image


def scene_captions(scene: Scene) -> List[str]:
    """Every caption template filled in for ``scene``: distinct strings, each true of the image."""
    forward, backward = _RELATIONS[scene.axis]
    first, second = scene.first.describe(), scene.second.describe()
    captions = []
    for subject, relations, obj in ((first, forward, second), (second, backward, first)):
        for relation in relations:
            captions.append(f'a {subject} {relation} a {obj}')
            captions.append(f'there is a {subject} {relation} a {obj}')
    # Partial descriptions: colors always tell the objects apart.
    captions.append(f'a {scene.first.describe(with_size=False)} {forward[0]} '
                    f'a {scene.second.describe(with_size=False)}')
    captions.append(f'a {scene.second.describe(with_size=False)} {backward[0]} '
                    f'a {scene.first.describe(with_size=False)}')
    captions.append(f'a picture of a {first} and a {second}')
    return captions


@DATASETS.register_module()
class SyntheticShapesDataset(Dataset):
    """Procedurally rendered two-object scenes with compositional captions (no download).

    Args:
        num_images: number of distinct images. Default: 2000 (train), 100 (test).
        image_size: side length S in pixels (>= 16).
        split: ``'train'`` (one item per image-caption pair) or ``'test'`` (one item per image,
            several captions, for retrieval).
        seed: scenes are a pure function of ``(seed, split, index)``.
        captions_per_image: captions sampled (without repetition) from the scene's 11 paraphrases.
            Default: 2 (train), 5 (test).
    """

    def __init__(self, num_images: Optional[int] = None, image_size: int = 32, split: str = 'train',
                 seed: int = 0, captions_per_image: Optional[int] = None):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if num_images is None:
            num_images = 2000 if split == 'train' else 100
        if captions_per_image is None:
            captions_per_image = 2 if split == 'train' else 5
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f'num_images must be a positive int, got {num_images!r}')
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f'image_size must be an int >= 16 (objects must stay visible), got {image_size!r}')
        self.num_images, self.image_size, self.split, self.seed = num_images, image_size, split, seed
        self.scenes: List[Scene] = []
        self.captions: List[List[str]] = []
        for index in range(num_images):
            rng = np.random.default_rng([seed, _SPLITS[split], index])
            scene = _random_scene(rng, image_size)
            while _split_of(scene) != split:
                scene = _random_scene(rng, image_size)
            candidates = scene_captions(scene)
            if not 1 <= captions_per_image <= len(candidates):
                raise ValueError(f'captions_per_image must be in [1, {len(candidates)}], got {captions_per_image}')
            chosen = rng.choice(len(candidates), size=captions_per_image, replace=False)
            self.scenes.append(scene)
            self.captions.append([candidates[i] for i in chosen])
        self.text = [caption for captions in self.captions for caption in captions]
        self.img2txt = {i: list(range(i * captions_per_image, (i + 1) * captions_per_image))
                        for i in range(num_images)}
        self.txt2img = {j: i for i, texts in self.img2txt.items() for j in texts}
        self.captions_per_image = captions_per_image
        self.metainfo: Dict[str, Any] = dict(vocabulary=self.vocabulary())

    @staticmethod
    def vocabulary() -> List[str]:
        """BERT special tokens, then every word a caption can contain (sorted)."""
        words = set(_TEMPLATE_WORDS) | set(COLORS) | set(SHAPES) | set(SIZES)
        for pair in _RELATIONS.values():
            for relations in pair:
                for relation in relations:
                    words.update(relation.split())
        return list(SPECIAL_TOKENS) + sorted(words)

    @classmethod
    def write_vocabulary(cls, path: str) -> str:
        """Write :meth:`vocabulary` one token per line (a BERT ``vocab.txt``); returns ``path``."""
        with open(path, 'w', encoding='utf-8') as handle:
            handle.write('\n'.join(cls.vocabulary()) + '\n')
        return path

    def image(self, image_index: int) -> torch.Tensor:
        """Image ``image_index`` as a ``(3, S, S)`` float32 tensor in [0, 1]."""
        return pil_to_tensor(render_scene(self.scenes[image_index], self.image_size))

    def __len__(self) -> int:
        return len(self.text) if self.split == 'train' else self.num_images

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for {len(self)} items')
        if self.split == 'train':
            image_index = self.txt2img[index]
            return dict(image=self.image(image_index), text=self.text[index], image_id=image_index)
        return dict(image=self.image(index), texts=list(self.captions[index]), image_id=index)
