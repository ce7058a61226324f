"""Image files to float tensors with PIL + numpy + torch only (no torchvision in the core).

``load_image(path, image_size)`` opens any format PIL reads, composites transparency onto
white (emoji PNGs are RGBA), converts to RGB, resizes to ``image_size`` x ``image_size``
(bicubic) and returns a ``(3, H, W)`` float32 tensor with values in [0, 1]. Normalisation
(mean/std) belongs to the model's data preprocessor, not to the dataset.

Example::

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), 'red.png')
    >>> Image.new('RGBA', (64, 48), (255, 0, 0, 255)).save(path)
    >>> img = load_image(path, image_size=32)
    >>> img.shape, img.dtype, img[:, 0, 0].tolist()
    (torch.Size([3, 32, 32]), torch.float32, [1.0, 0.0, 0.0])
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

__all__ = ['load_image', 'pil_to_tensor', 'to_rgb']


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB mode; transparent pixels become white, as on a page."""
    if image.mode in ('RGBA', 'LA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return image.convert('RGB')


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``(3, H, W)`` float32 tensor in [0, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str, image_size: int) -> torch.Tensor:
    """The image at ``path``, RGB, resized to ``image_size`` squared: ``(3, image_size, image_size)``.

    Raises:
        FileNotFoundError: no file at ``path`` (the message gives the absolute path).
        ValueError: ``image_size`` < 1, or PIL cannot decode the file.
    """
    if image_size < 1:
        raise ValueError(f'image_size must be a positive int, got {image_size}')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image file not found: {os.path.abspath(path)}')
    try:
        with Image.open(path) as image:
            image = to_rgb(image)
    except OSError as error:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f'cannot decode image file {os.path.abspath(path)}: {error}') from error
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return pil_to_tensor(image)
