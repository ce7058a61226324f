"""A retrieval gallery: a few query captions and the images the model ranks first for them.

The candidates are the first ``num_images`` images of a retrieval dataset (items
``dict(image, texts, image_id)``, e.g. ``SyntheticShapesDataset(split='test')`` or
``CaptionRetrievalDataset``); the score is the cosine similarity of the student embeddings
(the model's ``extract_feats``), i.e. the plain retrieval score without ITM re-ranking. The
queries are the first captions of ``num_queries`` images spread evenly over the candidates.

Example::

    >>> queries = retrieval_gallery(model, dataset, num_images=100, num_queries=4, top_k=5)
    >>> plot_gallery(queries, 'gallery.png')
"""
from __future__ import annotations

from typing import List

import torch

from vlp_codebook.datasets.collate import vlp_collate

__all__ = ['retrieval_gallery']


@torch.no_grad()
def retrieval_gallery(model, dataset, num_images: int = 100, num_queries: int = 4, top_k: int = 5,
                      batch_size: int = 50) -> List[dict]:
    """Top-``top_k`` images of each query caption among the dataset's first ``num_images``: one dict
    per query with ``text``, ``images`` (top_k (3, H, W) tensors in [0, 1]), ``correct`` (bools),
    ``scores`` (cosine similarities) and ``rank`` (0-based rank of the query's own image; ties
    counted against it, as ``retrieval_recalls`` does)."""
    if min(num_images, num_queries, top_k, batch_size) < 1:
        raise ValueError(f'num_images, num_queries, top_k and batch_size must be positive, got '
                         f'{num_images}, {num_queries}, {top_k}, {batch_size}')
    num_images = min(num_images, len(dataset))
    was_training = model.training
    model.eval()
    try:
        image_embeds, items = [], []
        for start in range(0, num_images, batch_size):
            batch = [dataset[i] for i in range(start, min(start + batch_size, num_images))]
            if any('image' not in item or 'texts' not in item for item in batch):
                raise ValueError("retrieval_gallery needs retrieval items with 'image' and 'texts' (a test "
                                 f'split), got keys {sorted(batch[0])}')
            data = model.data_preprocessor(vlp_collate(batch), False)
            image_embeds.append(model.extract_feats(images=data['images'])['image_embeds'].float())
            items.extend(batch)
        image_embeds = torch.nn.functional.normalize(torch.cat(image_embeds), dim=1)
        owners = sorted({int(round(i * num_images / num_queries)) for i in range(num_queries)})
        owners = [owner for owner in owners if owner < num_images]
        texts = [items[owner]['texts'][0] for owner in owners]
        data = model.data_preprocessor(vlp_collate([dict(image=items[o]['image'], texts=[t], image_id=o)
                                                    for o, t in zip(owners, texts)]), False)
        text_embeds = model.extract_feats(input_ids=data['input_ids'],
                                          attention_mask=data['attention_mask'])['text_embeds'].float()
        scores = torch.nn.functional.normalize(text_embeds, dim=1) @ image_embeds.T        # (queries, images)
    finally:
        model.train(was_training)
    queries = []
    for row, (owner, text) in enumerate(zip(owners, texts)):
        top = scores[row].topk(min(top_k, num_images)).indices.tolist()
        rank = int((scores[row] >= scores[row, owner]).sum()) - 1
        queries.append(dict(text=text, images=[items[i]['image'] for i in top], correct=[i == owner for i in top],
                            scores=[float(scores[row, i]) for i in top], rank=rank))
    return queries
