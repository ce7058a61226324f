"""ITM re-ranking of the top-k retrieval candidates, as ALBEF evaluates retrieval
(``Retrieval.py::evaluation``).

Contrastive similarities ``S`` (images x texts) are cheap for all pairs; the ITM head costs one
fusion pass per pair, so only the ``k`` most similar candidates of every query are scored with
``itm(i, j)`` (+ ``S[i, j]`` when ``add_similarity``, as BLIP). Every other candidate gets a
finite floor just below the smallest re-ranked score (ALBEF: -100), so recall at cut-offs above
``k`` only counts the top k, ties at the floor counting against the query.

Under torch.distributed every rank passes the same ``score_i2t``; each scores a contiguous share
of the pairs and the shares are gathered, so all ranks return the same matrices.

Example::

    >>> import torch
    >>> sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.7, 0.6]])
    >>> truth = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])   # what the ITM head would say
    >>> score_i2t, score_t2i = itm_rerank(sim, lambda i, j: truth[i, j], k=2)
    >>> score_i2t.argmax(dim=1).tolist()    # image 0 -> text 1, image 1 -> text 2
    [1, 2]
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from vlp_codebook import dist

__all__ = ['itm_rerank']

PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _score_pairs(pair_scorer: PairScorer, image_index: torch.Tensor, text_index: torch.Tensor,
                 batch_size: int) -> torch.Tensor:
    scores = [torch.zeros(0)]
    for start in range(0, image_index.numel(), batch_size):
        images, texts = image_index[start:start + batch_size], text_index[start:start + batch_size]
        chunk = torch.as_tensor(pair_scorer(images, texts)).detach().float().cpu().reshape(-1)
        if chunk.numel() != images.numel():
            raise ValueError(f'pair_scorer returned {chunk.numel()} scores for {images.numel()} pairs')
        scores.append(chunk)
    result = torch.cat(scores)
    if not torch.isfinite(result).all():
        raise ValueError('pair_scorer returned NaN or inf scores')
    return result


def _score_pairs_sharded(pair_scorer: PairScorer, image_index: torch.Tensor, text_index: torch.Tensor,
                         batch_size: int, group: Optional[object]) -> torch.Tensor:
    """All pairs' scores; under torch.distributed each rank scores its share, then they are gathered
    (in one process the share is every pair and the gather returns it)."""
    share = dist.even_shard(image_index.numel(), group)
    local = _score_pairs(pair_scorer, image_index[share], text_index[share], batch_size)
    scores = dist.gather_no_grad(local.to(dist.communication_device(group)), group).cpu()
    if scores.numel() != image_index.numel():
        raise RuntimeError(f'ranks scored {scores.numel()} pairs in all, expected {image_index.numel()}: '
                           'every rank must pass the same score_i2t and k')
    return scores


def itm_rerank(score_i2t: torch.Tensor, pair_scorer: PairScorer, k: int = 128, add_similarity: bool = False,
               batch_size: int = 256, process_group: Optional[object] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Re-score the top-``k`` candidates of every query with ``pair_scorer``.

    Args:
        score_i2t: (N_img, N_txt) similarity scores.
        pair_scorer: ``pair_scorer(image_index (P,), text_index (P,)) -> (P,)`` ITM scores,
            called with ``batch_size`` pairs at most.
        k: candidates re-scored per query (ALBEF: 256 on COCO, 128 on Flickr30K).
        add_similarity: final score = ITM + similarity (BLIP) instead of ITM alone (ALBEF).
        process_group: the ranks that share the pairs (default group when None).

    Returns:
        ``(score_i2t (N_img, N_txt), score_t2i (N_txt, N_img))``, re-ranked.
    """
    score_i2t = torch.as_tensor(score_i2t).detach().float().cpu()
    if score_i2t.dim() != 2 or 0 in score_i2t.shape:
        raise ValueError(f'score_i2t must be a non-empty 2-D matrix, got shape {tuple(score_i2t.shape)}')
    if not torch.isfinite(score_i2t).all():
        from vlp_codebook.evaluation.retrieval import loaded_checkpoint_note, nonfinite_rows
        rows = nonfinite_rows(score_i2t)
        raise ValueError(f'itm_rerank: score_i2t (the embedding similarities to re-rank) contains NaN or inf in '
                         f'{len(rows)} of {score_i2t.shape[0]} image rows {rows[:8]}{loaded_checkpoint_note()}')
    if k < 1 or batch_size < 1:
        raise ValueError(f'k and batch_size must be positive, got k={k}, batch_size={batch_size}')
    num_images, num_texts = score_i2t.shape

    def rerank(sim: torch.Tensor, queries_are_images: bool) -> torch.Tensor:
        top_sim, top_index = sim.topk(min(k, sim.shape[1]), dim=1)
        query_index = torch.arange(sim.shape[0]).unsqueeze(1).expand_as(top_index).reshape(-1)
        candidate_index = top_index.reshape(-1)
        pairs = (query_index, candidate_index) if queries_are_images else (candidate_index, query_index)
        scores = _score_pairs_sharded(pair_scorer, *pairs, batch_size, process_group).view_as(top_sim)
        if add_similarity:
            scores = scores + top_sim
        floor = scores.min() - 1.0
        result = torch.full_like(sim, floor.item())
        return result.scatter_(1, top_index, scores)

    return rerank(score_i2t, True), rerank(score_i2t.T.contiguous(), False)
