r"""RandAugment with ALBEF's operations and magnitudes, on PIL images (no torchvision in the core).

RandAugment (Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced
search space", CVPR-W 2020) applies ``num_ops`` operations drawn uniformly (with replacement)
from a list, all at one magnitude level :math:`m \in [0, 10]`. ALBEF (and so CODIS) trains with
``num_ops=2, magnitude=7`` over the ten operations below, each applied with probability 0.5;
colour-changing operations (Color, Invert, Solarize, Posterize) are left out, since captions
name colours. With :math:`s = m / 10`:

==============================  ===========================================================
operation                       effect
==============================  ===========================================================
``Identity``                    none
``AutoContrast``, ``Equalize``  PIL ``ImageOps`` (per channel)
``Brightness``, ``Sharpness``   PIL ``ImageEnhance`` with factor :math:`0.1 + 1.8 s`
``ShearX``, ``ShearY``          shear :math:`\pm 0.3 s` (random sign)
``TranslateX``, ``TranslateY``  shift by :math:`\pm 10 s` pixels (random sign)
``Rotate``                      rotate by :math:`\pm 30 s` degrees (random sign)
==============================  ===========================================================

Geometric operations fill uncovered pixels with grey (128, 128, 128).

Example::

    >>> from PIL import Image
    >>> augment = RandAugment(num_ops=2, magnitude=7)
    >>> augment(Image.new('RGB', (32, 32), (200, 30, 30))).size
    (32, 32)
"""
from __future__ import annotations

import random
from typing import Callable, Dict, Optional, Sequence

from PIL import Image, ImageEnhance, ImageOps

__all__ = ['RandAugment', 'ALBEF_OPS', 'apply_op']

ALBEF_OPS = ('Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
             'TranslateX', 'TranslateY', 'Rotate')
MAX_LEVEL = 10.0
FILL = (128, 128, 128)


def _affine(image: Image.Image, coefficients) -> Image.Image:
    # PIL's AFFINE maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    return image.transform(image.size, Image.AFFINE, coefficients, resample=Image.NEAREST, fillcolor=FILL)


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


_OPS: Dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    'Identity': lambda image, s, rng: image,
    'AutoContrast': lambda image, s, rng: ImageOps.autocontrast(image),
    'Equalize': lambda image, s, rng: ImageOps.equalize(image),
    'Brightness': lambda image, s, rng: ImageEnhance.Brightness(image).enhance(0.1 + 1.8 * s),
    'Sharpness': lambda image, s, rng: ImageEnhance.Sharpness(image).enhance(0.1 + 1.8 * s),
    'ShearX': lambda image, s, rng: _affine(image, (1, _signed(0.3 * s, rng), 0, 0, 1, 0)),
    'ShearY': lambda image, s, rng: _affine(image, (1, 0, 0, _signed(0.3 * s, rng), 1, 0)),
    # An output pixel at x shows the input at x - t: the content moves by +t.
    'TranslateX': lambda image, s, rng: _affine(image, (1, 0, -_signed(10.0 * s, rng), 0, 1, 0)),
    'TranslateY': lambda image, s, rng: _affine(image, (1, 0, 0, 0, 1, -_signed(10.0 * s, rng))),
    'Rotate': lambda image, s, rng: image.rotate(_signed(30.0 * s, rng), resample=Image.NEAREST, fillcolor=FILL),
}


def apply_op(name: str, image: Image.Image, magnitude: float, rng: Optional[random.Random] = None) -> Image.Image:
    """One operation of the table at level ``magnitude`` (0..10) on an RGB ``image``."""
    if name not in _OPS:
        raise ValueError(f'unknown RandAugment operation {name!r}; known: {", ".join(_OPS)}')
    return _OPS[name](image, magnitude / MAX_LEVEL, rng or random)


class RandAugment:
    """Apply ``num_ops`` random operations at level ``magnitude``, each with probability ``prob``.

    Args:
        num_ops: operations drawn per image (with replacement; ALBEF: 2).
        magnitude: level in [0, 10] (ALBEF: 7).
        ops: names from the module table (default: ALBEF's ten).
        prob: probability that a drawn operation is applied (ALBEF: 0.5).

    Call: ``augment(image: PIL RGB, rng=None) -> PIL RGB`` of the same size; ``rng``: a
    ``random.Random`` (default: the global one, which mmengine seeds per worker).
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 7, ops: Sequence[str] = ALBEF_OPS, prob: float = 0.5):
        if num_ops < 0:
            raise ValueError(f'num_ops must be >= 0, got {num_ops}')
        if not 0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f'magnitude must be in [0, {MAX_LEVEL:g}], got {magnitude}')
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f'prob must be in [0, 1], got {prob}')
        unknown = [name for name in ops if name not in _OPS]
        if unknown or not ops:
            raise ValueError(f'ops must be a non-empty list of known operations; unknown: {unknown}; '
                             f'known: {", ".join(_OPS)}')
        self.num_ops, self.magnitude, self.ops, self.prob = int(num_ops), float(magnitude), tuple(ops), float(prob)

    def __call__(self, image: Image.Image, rng: Optional[random.Random] = None) -> Image.Image:
        rng = rng or random
        for _ in range(self.num_ops):
            name = rng.choice(self.ops)
            if rng.random() < self.prob:
                image = apply_op(name, image, self.magnitude, rng)
        return image

    def __repr__(self) -> str:
        return f'RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude:g}, prob={self.prob:g}, ops={list(self.ops)})'
