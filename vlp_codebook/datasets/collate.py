"""``vlp_collate``: batches image-caption items into the keys the CODIS data preprocessor reads.

Training items ``dict(image, text, image_id)`` become ::

    dict(images=FloatTensor (N, 3, H, W), texts=list[str] (N), image_ids=LongTensor (N,))

retrieval items ``dict(image, texts, image_id)`` become the same with ``texts`` a
``list[list[str]]`` (each image's captions; images may have different numbers of captions).
mmengine's ``default_collate`` would transpose the lists of captions, hence this function.

Example (mmengine dataloader config)::

    val_dataloader = dict(batch_size=32, collate_fn=dict(type='vlp_codebook.vlp_collate'),
                          sampler=dict(type='DefaultSampler', shuffle=False),
                          dataset=dict(type='SyntheticShapesDataset', split='test'))
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import torch

from vlp_codebook.registry import FUNCTIONS

__all__ = ['vlp_collate']


@FUNCTIONS.register_module()
def vlp_collate(batch: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Stack ``batch`` (items of a caption dataset) into ``images``, ``texts``, ``image_ids``.

    Raises:
        ValueError: empty batch, items without ``image``/``image_id``, items mixing ``text``
            and ``texts``, or images of different shapes.
    """
    if len(batch) == 0:
        raise ValueError('vlp_collate got an empty batch')
    for position, item in enumerate(batch):
        missing = {'image', 'image_id'} - set(item)
        if missing:
            raise ValueError(f'batch item {position} has no {sorted(missing)} (keys: {sorted(item)})')
    has_text = ['text' in item for item in batch]
    has_texts = ['texts' in item for item in batch]
    if all(has_text) and not any(has_texts):
        texts = [item['text'] for item in batch]
    elif all(has_texts) and not any(has_text):
        texts = [list(item['texts']) for item in batch]
    else:
        raise ValueError("every batch item must have either 'text' (training) or 'texts' (retrieval), "
                         'not a mix of both or neither')
    shapes = {tuple(item['image'].shape) for item in batch}
    if len(shapes) != 1:
        raise ValueError(f'images of one batch must share a shape, got {sorted(shapes)}')
    return dict(images=torch.stack([item['image'] for item in batch]),
                texts=texts,
                image_ids=torch.as_tensor([int(item['image_id']) for item in batch], dtype=torch.long))
