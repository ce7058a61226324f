"""Image files to float tensors with PIL + numpy + torch only (no torchvision in the core).

:func:`load_image` opens any format PIL reads, composites transparency onto white (emoji PNGs
are RGBA), scales 16-bit and float grayscale to 8 bits, converts to RGB, resizes (bicubic) to
``image_size`` squared and returns ``(3, H, W)`` float32 in [0, 1]; normalisation belongs to the
data preprocessor. ``crop_scale=(lo, hi)`` first cuts ALBEF's random resized crop: a box of a
random area fraction in ``[lo, hi]`` with an aspect ratio log-uniform in ``[3/4, 4/3]``.

Example::

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), 'red.png')
    >>> Image.new('RGBA', (64, 48), (255, 0, 0, 255)).save(path)
    >>> img = load_image(path, image_size=32)
    >>> img.shape, img.dtype, img[:, 0, 0].tolist()
    (torch.Size([3, 32, 32]), torch.float32, [1.0, 0.0, 0.0])
"""
from __future__ import annotations

import math
import os
import random
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ['load_image', 'pil_to_tensor', 'to_rgb', 'to_8bit', 'random_crop_box', 'check_crop_scale']


#: 16-bit integer modes (16-bit grayscale PNG/TIFF): 0..65535 maps to 0..255
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def to_8bit(image: Image.Image, source: str = 'image') -> Image.Image:
    """High-bit-depth grayscale as 8-bit ``'L'``, scaled (PIL's own ``convert`` clips instead:
    a 16-bit PNG turns white, a float TIFF in [0, 1] black). Other modes are returned as they are.

    * 16-bit (``I;16*``, and ``I`` from a PNG, which older Pillow uses for 16-bit): divided by 257.
    * float (``F``): values in [0, 1] are multiplied by 255.

    Raises:
        ValueError (naming ``source``): a float image with values outside [0, 1] or not finite, or a
            32-bit integer image (mode ``I`` not from a PNG), whose range cannot be known.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or (mode == 'I' and image.format == 'PNG'):
        array = np.asarray(image).astype(np.float64) / 257.0
    elif mode == 'F':
        array = np.asarray(image).astype(np.float64)
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not (np.isfinite(array).all() and low >= 0.0 and high <= 1.0):
            raise ValueError(f'{source}: a floating-point image with values in [{low:g}, {high:g}]; only '
                             'float images in [0, 1] can be read (save it as 8- or 16-bit PNG, or scale it '
                             'to [0, 1])')
        array = array * 255.0
    elif mode == 'I':
        raise ValueError(f'{source}: a 32-bit integer image (PIL mode I, {image.format or "unknown"} format), '
                         'whose value range cannot be known; save it as an 8- or 16-bit image')
    else:
        return image
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode='L')


def to_rgb(image: Image.Image, source: str = 'image') -> Image.Image:
    """``image`` in RGB mode; transparent pixels become white, as on a page; 16-bit and float
    grayscale are scaled to 8 bits first (:func:`to_8bit`)."""
    image = to_8bit(image, source)
    if image.mode in ('RGBA', 'LA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return image.convert('RGB')


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``(3, H, W)`` float32 tensor in [0, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def check_crop_scale(crop_scale: Optional[Tuple[float, float]]) -> Optional[Tuple[float, float]]:
    """``crop_scale`` as a float pair with ``0 < lo <= hi <= 1`` (or None); else ``ValueError``."""
    if crop_scale is None:
        return None
    try:
        lo, hi = (float(x) for x in crop_scale)
    except (TypeError, ValueError):
        raise ValueError(f'crop_scale must be a pair (min, max) of area fractions, got {crop_scale!r}') from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f'crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale!r}')
    return lo, hi


def random_crop_box(width: int, height: int, crop_scale: Tuple[float, float],
                    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                    rng: Optional[random.Random] = None) -> Tuple[int, int, int, int]:
    """A random ``(left, top, right, bottom)`` box of the random resized crop.

    Area fraction uniform in ``crop_scale``, aspect ratio (w/h) log-uniform in ``ratio``; after
    10 draws that do not fit, the largest centred box whose ratio lies in ``ratio``.
    ``rng``: a ``random.Random`` (default: Python's global generator, which mmengine seeds per
    dataloader worker).
    """
    rng = rng or random
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*crop_scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def load_image(path: str, image_size: int, crop_scale: Optional[Tuple[float, float]] = None,
               rng: Optional[random.Random] = None,
               augment: Optional[Callable[[Image.Image], Image.Image]] = None) -> torch.Tensor:
    """The image at ``path``, RGB, resized to ``image_size`` squared: ``(3, image_size, image_size)``.

    With ``crop_scale=(lo, hi)`` a random box (:func:`random_crop_box`) is resized instead of
    the whole image. ``augment`` (e.g. :class:`~vlp_codebook.datasets.rand_augment.RandAugment`)
    is applied to the resized PIL image.

    Raises:
        FileNotFoundError: no file at ``path`` (the message gives the absolute path).
        ValueError: ``image_size`` < 1, a bad ``crop_scale``, PIL cannot decode the file, or its
            pixel values have no known range (see :func:`to_8bit`).
    """
    if image_size < 1:
        raise ValueError(f'image_size must be a positive int, got {image_size}')
    crop_scale = check_crop_scale(crop_scale)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image file not found: {os.path.abspath(path)}')
    try:
        with Image.open(path) as image:
            image = to_rgb(image, source=f'image file {os.path.abspath(path)}')
    except OSError as error:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f'cannot decode image file {os.path.abspath(path)}: {error}') from error
    if crop_scale is not None:
        box = random_crop_box(image.width, image.height, crop_scale, rng=rng)
        # Crop, then resize (as torchvision's RandomResizedCrop): no pixel outside the box leaks in.
        image = image.crop(box).resize((image_size, image_size), Image.BICUBIC)
    elif image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    if augment is not None:
        image = augment(image)
    return pil_to_tensor(image)
