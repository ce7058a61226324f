r"""Image-text matching (ITM) with hard negatives sampled from in-batch similarities (ALBEF).

A linear head on the fusion encoder's [CLS] state classifies a (text, image) pair as matched
(class 1) or not. Each image gets one negative text drawn with probability

.. math::
    P(j \mid i) = \frac{\exp(s^{i2t}_{ij})}{\sum_{j' \notin \mathcal{E}_i} \exp(s^{i2t}_{ij'})},
    \quad j \notin \mathcal{E}_i,

with :math:`s^{i2t} = z_v z_t^\top / \gamma` and :math:`\mathcal{E}_i` the positive and every
candidate with the same instance id; symmetrically one negative image per text. The loss is the
fp32 cross-entropy over the 3B pairs (B positives, B + B negatives). A row without any allowed
candidate drops its negative pair rather than invent one.

Distributed: the similarity columns are this rank's batch (ALBEF) or the joint batch; in the
latter case the negatives' text states and image tokens are gathered with gradient (texts padded
to the longest length over ranks), so a negative from another rank trains that rank's encoders.

Example::

    >>> import torch
    >>> from vlp_codebook.registry import MODELS
    >>> fusion = MODELS.build(dict(type='BertFusionEncoder', hidden_size=32, num_layers=1, num_heads=4))
    >>> head = MODELS.build(dict(type='ImageTextMatchingHead', hidden_size=32))
    >>> itm = MODELS.build(dict(type='ImageTextMatchingLoss'))
    >>> text, mask, image = torch.randn(4, 7, 32), torch.ones(4, 7), torch.randn(4, 17, 32)
    >>> sim = torch.randn(4, 4)
    >>> loss = itm(fusion, head, text, mask, image, sim, sim.T, ids=torch.arange(4))['loss_itm']
    >>> loss.backward()
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from vlp_codebook import dist
from vlp_codebook.checks import check_finite
from vlp_codebook.registry import MODELS

__all__ = ['ImageTextMatchingHead', 'ImageTextMatchingLoss', 'sample_hard_negatives', 'itm_score']


@MODELS.register_module()
class ImageTextMatchingHead(nn.Module):
    """Linear classifier (D -> 2) on the fused [CLS] state; class 1 = matched pair.

    Shapes:
        forward: fused (N, L, D) (row 0 is taken) or (N, D) -> logits (N, 2).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.classifier = nn.Linear(hidden_size, 2)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        if fused.dim() == 3:
            fused = fused[:, 0]
        if fused.dim() != 2 or fused.shape[-1] != self.hidden_size:
            raise ValueError(f'fused must be (N, L, {self.hidden_size}) or (N, {self.hidden_size}), '
                             f'got {tuple(fused.shape)}')
        return self.classifier(fused)


def sample_hard_negatives(sim: torch.Tensor, positive_index: torch.Tensor,
                          query_ids: Optional[torch.Tensor] = None, key_ids: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One negative key per query, drawn with probability softmax(sim) over allowed keys.

    Args:
        sim: (B, K) similarity logits (already divided by the temperature).
        positive_index: (B,) column of each row's positive; always excluded.
        query_ids, key_ids: (B,), (K,) instance ids; keys sharing the query's id are excluded.
            Give both or neither.
        generator: makes the draw reproducible; sampling runs on its device.

    Returns:
        index (B,) long: the chosen column; valid (B,) bool: False where no key was allowed
        (its index is meaningless).
    """
    if sim.dim() != 2:
        raise ValueError(f'sim must be (B, K), got shape {tuple(sim.shape)}')
    check_finite('sim', sim)
    rows, cols = sim.shape
    positive_index = positive_index.to(sim.device)
    if positive_index.shape != (rows,):
        raise ValueError(f'positive_index must be ({rows},), got {tuple(positive_index.shape)}')
    excluded = torch.zeros(rows, cols, dtype=torch.bool, device=sim.device)
    excluded[torch.arange(rows, device=sim.device), positive_index] = True
    if (query_ids is None) != (key_ids is None):
        raise ValueError('give both query_ids and key_ids, or neither')
    if query_ids is not None:
        if query_ids.shape != (rows,) or key_ids.shape != (cols,):
            raise ValueError(f'ids must be ({rows},) and ({cols},), got {tuple(query_ids.shape)}, '
                             f'{tuple(key_ids.shape)}')
        excluded |= query_ids.to(sim.device)[:, None] == key_ids.to(sim.device)[None, :]
    valid = ~excluded.all(dim=1)
    logits = sim.detach().float().masked_fill(excluded, float('-inf'))
    # Rows without an allowed key get uniform weights just so multinomial runs; flagged invalid.
    logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))
    probs = torch.softmax(logits, dim=1)
    if generator is not None:
        probs = probs.to(generator.device)
    index = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(sim.device)
    return index, valid


def _pad_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of (N, L, ...) to ``length``."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1]) + tuple(x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def _check_shapes(text_hidden, text_mask, image_tokens, sim_i2t, sim_t2i, ids) -> None:
    batch = text_hidden.shape[0]
    if text_mask.shape != text_hidden.shape[:2]:
        raise ValueError(f'text_mask must be {tuple(text_hidden.shape[:2])}, got {tuple(text_mask.shape)}')
    if image_tokens.shape[0] != batch:
        raise ValueError(f'image_tokens has {image_tokens.shape[0]} rows, text_hidden {batch}')
    if sim_i2t.shape != sim_t2i.shape or sim_i2t.dim() != 2 or sim_i2t.shape[0] != batch:
        raise ValueError(f'sim_i2t and sim_t2i must both be (B={batch}, K), got {tuple(sim_i2t.shape)} '
                         f'and {tuple(sim_t2i.shape)}')
    if ids is not None and ids.shape != (batch,):
        raise ValueError(f'ids must be ({batch},), got {tuple(ids.shape)}')


def _negative_pool(text_hidden, text_mask, image_tokens, image_mask, ids, num_keys: int):
    """What the negatives are drawn from: this rank's pairs (ALBEF pretraining) when the
    similarities have ``B`` columns, the joint batch over ranks (gathered; texts padded to one
    length) when they have ``B_joint``. Returns ``(text_hidden, text_mask, start, keys)``:
    the (padded) local texts, the offset of this rank's pairs among the keys, and the keys'
    ``(texts, text masks, image tokens, image masks, ids)``."""
    batch = text_hidden.shape[0]
    joint = sum(dist.batch_sizes(batch, text_hidden.device)) if dist.is_distributed() else batch
    if num_keys not in (batch, joint):
        raise ValueError(f'sim_i2t has {num_keys} columns: expected the local batch ({batch}) or '
                         f'the joint batch over ranks ({joint})')
    if num_keys == batch:
        return text_hidden, text_mask, 0, (text_hidden, text_mask, image_tokens, image_mask, ids)
    length = int(dist.all_reduce_max(torch.tensor(text_hidden.shape[1], device=text_hidden.device)))
    text_hidden, text_mask = _pad_length(text_hidden, length), _pad_length(text_mask, length)
    start = dist.local_slice(batch, device=text_hidden.device).start
    keys = (dist.gather_with_grad(text_hidden), dist.gather_no_grad(text_mask), dist.gather_with_grad(image_tokens),
            dist.gather_no_grad(image_mask), dist.gather_no_grad(ids) if ids is not None else None)
    return text_hidden, text_mask, start, keys


@MODELS.register_module()
class ImageTextMatchingLoss(nn.Module):
    """ALBEF's ITM loss with hard negatives (see module docstring).

    Args:
        loss_weight: multiplies the loss.
        exclude_same_id: with ``ids`` given, never pick a negative of the same instance id.
    """

    def __init__(self, loss_weight: float = 1.0, exclude_same_id: bool = True):
        super().__init__()
        self.loss_weight = loss_weight
        self.exclude_same_id = exclude_same_id

    def forward(self, fusion: Callable, head: Callable, text_hidden: torch.Tensor, text_mask: torch.Tensor,
                image_tokens: torch.Tensor, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                ids: Optional[torch.Tensor] = None, image_mask: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """ITM loss on this rank's B pairs.

        Args:
            fusion: ``fusion(text_hidden, mask, image_tokens, image_mask) -> (N, L, D)``
                (a :class:`BertFusionEncoder`).
            head: ``head(fused) -> (N, 2)`` (an :class:`ImageTextMatchingHead`).
            text_hidden: (B, L, D) text-encoder states; text_mask: (B, L).
            image_tokens: (B, P, D_v); image_mask: (B, P) or None.
            sim_i2t: (B, K) image-to-text logits, sim_t2i: (B, K) text-to-image logits; K = B
                (local keys) or the joint batch size (keys gathered over ranks).
            ids: (B,) instance ids of this rank's pairs (e.g. image ids), or None.
            generator: for reproducible negatives.

        Returns:
            ``{'loss_itm': scalar fp32}``.
        """
        batch = text_hidden.shape[0]
        _check_shapes(text_hidden, text_mask, image_tokens, sim_i2t, sim_t2i, ids)
        if image_mask is None:
            image_mask = torch.ones(image_tokens.shape[:2], dtype=text_mask.dtype, device=image_tokens.device)
        text_hidden, text_mask, start, keys = _negative_pool(text_hidden, text_mask, image_tokens, image_mask,
                                                             ids, sim_i2t.shape[1])
        keys_text, keys_mask, keys_image, keys_image_mask, key_ids = keys
        positive = torch.arange(start, start + batch, device=sim_i2t.device)
        use_ids = self.exclude_same_id and ids is not None
        neg_text, ok_text = sample_hard_negatives(sim_i2t, positive, ids if use_ids else None,
                                                  key_ids if use_ids else None, generator)
        neg_image, ok_image = sample_hard_negatives(sim_t2i, positive, ids if use_ids else None,
                                                    key_ids if use_ids else None, generator)
        rows_t, rows_i = ok_text.nonzero().squeeze(1), ok_image.nonzero().squeeze(1)
        neg_text, neg_image = neg_text[rows_t], neg_image[rows_i]

        texts = torch.cat([text_hidden, keys_text[neg_text], text_hidden[rows_i]])
        masks = torch.cat([text_mask, keys_mask[neg_text], text_mask[rows_i]])
        images = torch.cat([image_tokens, image_tokens[rows_t], keys_image[neg_image]])
        image_masks = torch.cat([image_mask, image_mask[rows_t], keys_image_mask[neg_image]])
        labels = torch.cat([torch.ones(batch, dtype=torch.long, device=texts.device),
                            torch.zeros(len(rows_t) + len(rows_i), dtype=torch.long, device=texts.device)])
        logits = head(fusion(texts, masks, images, image_masks))
        loss = F.cross_entropy(logits.float(), labels)
        # Joint-batch gradient under DDP with unequal local batches (dist.batch_weight).
        return {'loss_itm': loss * (self.loss_weight * dist.batch_weight(labels.shape[0], labels.device))}


def itm_score(fusion: Callable, head: Callable, text_hidden: torch.Tensor, text_mask: torch.Tensor,
              image_tokens: torch.Tensor, image_mask: Optional[torch.Tensor] = None,
              output: str = 'logit') -> torch.Tensor:
    """Matching score of N given (text, image) pairs, for ITM re-ranking of retrieval candidates.

    Args:
        fusion, head: as :meth:`ImageTextMatchingLoss.forward`.
        text_hidden (N, L, D), text_mask (N, L), image_tokens (N, P, D_v): row n is one pair.
        output: ``'logit'`` -- the positive-class logit, as ALBEF re-ranks; ``'prob'`` -- the
            positive-class probability softmax(logits)[:, 1].

    Returns:
        (N,) fp32 scores, higher = better match.
    """
    if output not in ('logit', 'prob'):
        raise ValueError(f"output must be 'logit' or 'prob', got {output!r}")
    logits = head(fusion(text_hidden, text_mask, image_tokens, image_mask)).float()
    return logits[:, 1] if output == 'logit' else logits.softmax(dim=1)[:, 1]
