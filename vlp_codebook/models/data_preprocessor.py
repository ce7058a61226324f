r"""Data preprocessor of the VLP models: images normalised, captions tokenised, all on the model device.

mmengine's ``BaseModel`` runs it on every collated batch before ``forward``, so the returned
keys are ``forward``'s keyword arguments. Input: ``'images'`` (N, 3, H, W) or a list of equal-size
(3, H, W), uint8 or float in [0, 1], normalised as :math:`(x - \mu) / \sigma` (CLIP's statistics,
as ALBEF); ``'texts'``, N strings (training) or N lists of strings (retrieval evaluation);
optional ``'image_ids'``, N integers.

Output dict:

================== ======================== ===============================================
key                shape / dtype            meaning
================== ======================== ===============================================
``images``         (N, 3, H, W) float32     normalised images
``input_ids``      (T, L) long              token ids, ``[CLS] ... [SEP] [PAD]...``
``attention_mask`` (T, L) long              1 = token, 0 = padding
``image_ids``      (N,) long or ``None``    ``None`` when the batch has none
``text_to_image``  (T,) long                (eval only) row of ``images`` each caption
                                            belongs to
``text_image_ids`` (T,) long                (eval only, with ``image_ids``) the caption's
                                            image id
================== ======================== ===============================================

T = N in training, else all captions flattened image by image, truncated to ``max_length`` tokens.

Example::

    >>> import torch
    >>> from vlp_codebook.registry import MODELS
    >>> pre = MODELS.build(dict(type='VLPDataPreprocessor', max_length=16,
    ...                         tokenizer=dict(type='BertTokenizerFromVocab', vocab=['a', 'red', 'circle'])))
    >>> out = pre({'images': torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
    ...            'texts': ['a red circle', 'a circle'], 'image_ids': [7, 8]}, training=True)
    >>> sorted(out)
    ['attention_mask', 'image_ids', 'images', 'input_ids']
"""
from __future__ import annotations

from numbers import Integral
from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from mmengine.model import BaseDataPreprocessor

from vlp_codebook.registry import MODELS

__all__ = ['VLPDataPreprocessor', 'CLIP_MEAN', 'CLIP_STD']

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@MODELS.register_module()
class VLPDataPreprocessor(BaseDataPreprocessor):
    """Normalise images, tokenise captions, move everything to the model's device.

    Args:
        tokenizer: a config dict built from ``MODELS`` (``BertTokenizerFromVocab``,
            ``PretrainedTokenizer``) or a tokenizer object.
        max_length: longest caption in tokens, [CLS]/[SEP] included (30, as ALBEF).
        mean, std: per-channel statistics of images scaled to [0, 1] (CLIP's, as ALBEF).
        normalize: if False, float images are passed on unchanged (already normalised by the
            pipeline) and uint8 images are only scaled to [0, 1].
        non_blocking: asynchronous host-to-device copies.

    Attributes:
        tokenizer, vocab_size, pad_token_id, mask_token_id, special_token_ids: what the model
        needs for MLM (:func:`vlp_codebook.models.heads.mlm.mask_tokens`).
    """

    def __init__(self, tokenizer: Union[dict, Any], max_length: int = 30,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 normalize: bool = True, non_blocking: bool = False):
        super().__init__(non_blocking=non_blocking)
        self.tokenizer = MODELS.build(tokenizer) if isinstance(tokenizer, Mapping) else tokenizer
        if not callable(self.tokenizer):
            raise TypeError(f'tokenizer must be a config dict or a callable tokenizer, got {type(tokenizer).__name__}')
        if max_length < 2:
            raise ValueError(f'max_length must be >= 2 ([CLS] and [SEP]), got {max_length}')
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f'mean and std must have 3 entries, std positive; got mean={mean}, std={std}')
        self.max_length = max_length
        self.normalize = normalize
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # Tokenizer facts the model needs for MLM.
    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    @property
    def special_token_ids(self) -> List[int]:
        return sorted(set(self.tokenizer.all_special_ids))

    def forward(self, data: Mapping, training: bool = False) -> dict:
        """Collated batch dict -> model inputs (see the module docstring for both layouts)."""
        if not isinstance(data, Mapping):
            raise TypeError(f'the batch must be a dict with "images" and "texts", got {type(data).__name__}')
        for key in ('images', 'texts'):
            if key not in data:
                raise KeyError(f'the batch lacks {key!r}; it has {sorted(data)}')
        images = self._images(data['images'])
        num_images = images.shape[0]
        texts, text_to_image = self._texts(data['texts'], num_images)
        image_ids = self._image_ids(data.get('image_ids'), num_images)

        tokens = self.tokenizer(texts, padding='longest', truncation=True, max_length=self.max_length,
                                return_tensors='pt')
        out = dict(images=images,
                   input_ids=tokens['input_ids'].to(self.device, non_blocking=self._non_blocking),
                   attention_mask=tokens['attention_mask'].to(self.device, non_blocking=self._non_blocking),
                   image_ids=image_ids)
        if text_to_image is not None:
            text_to_image = text_to_image.to(self.device)
            out['text_to_image'] = text_to_image
            if image_ids is not None:
                out['text_image_ids'] = image_ids[text_to_image]
        return out

    def _images(self, images) -> torch.Tensor:
        if isinstance(images, (list, tuple)):
            if not images or not all(isinstance(im, torch.Tensor) for im in images):
                raise TypeError('images must be a tensor or a non-empty list of tensors')
            shapes = {tuple(im.shape) for im in images}
            if len(shapes) != 1:
                raise ValueError(f'images in a batch must share one size to be stacked, got {sorted(shapes)}')
            images = torch.stack(list(images))
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f'images must be (N, 3, H, W), got {tuple(getattr(images, "shape", ()))} '
                             f'({type(images).__name__})')
        images = images.to(self.device, non_blocking=self._non_blocking)
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif images.is_floating_point():
            images = images.float()
            if self.normalize and images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
                raise ValueError(f'float images must lie in [0, 1] before normalisation, got '
                                 f'[{float(images.min()):.3g}, {float(images.max()):.3g}]; pass uint8, scale '
                                 'them, or set normalize=False if the pipeline normalised them already')
        else:
            raise ValueError(f'images must be uint8 or float, got {images.dtype}')
        if self.normalize:
            images = (images - self.mean) / self.std
        return images

    @staticmethod
    def _texts(texts, num_images: int):
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f'texts must be a list of strings (or of lists of strings), got {type(texts).__name__}')
        if len(texts) != num_images:
            raise ValueError(f'texts has {len(texts)} entries but there are {num_images} images')
        if all(isinstance(t, str) for t in texts):
            return list(texts), None
        flat, owner = [], []
        for i, captions in enumerate(texts):
            if isinstance(captions, str) or not isinstance(captions, Sequence) or not captions \
                    or not all(isinstance(c, str) for c in captions):
                raise TypeError(f'texts[{i}] must be a non-empty list of strings (retrieval evaluation) '
                                f'when texts is not a list of strings, got {captions!r}')
            flat.extend(captions)
            owner.extend([i] * len(captions))
        return flat, torch.tensor(owner, dtype=torch.long)

    def _image_ids(self, ids, num_images: int) -> Optional[torch.Tensor]:
        if ids is None:
            return None
        if isinstance(ids, torch.Tensor):
            tensor = ids
        elif isinstance(ids, np.ndarray):
            tensor = torch.from_numpy(ids)
        elif isinstance(ids, Sequence) and all(isinstance(i, (Integral, torch.Tensor, np.integer)) for i in ids):
            tensor = torch.tensor([int(i) for i in ids])
        else:
            raise TypeError(f'image_ids must be integers (list, array or tensor), got {ids!r:.200}')
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f'image_ids must be integers, got dtype {tensor.dtype}')
        tensor = tensor.reshape(-1).long()
        if tensor.numel() != num_images:
            raise ValueError(f'image_ids has {tensor.numel()} entries but there are {num_images} images')
        return tensor.to(self.device)
