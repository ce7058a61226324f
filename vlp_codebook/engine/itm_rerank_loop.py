"""Retrieval evaluation with ITM re-ranking of the top-k candidates, as ALBEF evaluates.

These loops collect the whole set's embeddings and the token states the fusion encoder needs,
re-score the ``k`` most similar candidates of every query with the ITM head
(:func:`vlp_codebook.evaluation.itm_rerank.itm_rerank`) and hand the score matrices to the
evaluator. The model needs ``data_preprocessor``, ``extract_feats`` and ``fusion_encoder`` +
``itm_head``, as :class:`CODIS`. Under torch.distributed every rank embeds the whole set in
dataset order (as ALBEF), scores its share of the pairs, and the scores are gathered.

Config::

    val_cfg = dict(type='ITMRerankValLoop', k=128)      # ALBEF: 128 on Flickr30K, 256 on COCO
    test_cfg = dict(type='ITMRerankTestLoop', k=256)
"""
from __future__ import annotations

from typing import Dict

import torch
from mmengine.runner import TestLoop, ValLoop
from torch.utils.data import DataLoader

from vlp_codebook import dist
from vlp_codebook.evaluation.itm_rerank import itm_rerank
from vlp_codebook.models.heads.itm import itm_score
from vlp_codebook.models.teachers.momentum_teacher import unwrap_model
from vlp_codebook.registry import LOOPS

__all__ = ['ITMRerankValLoop', 'ITMRerankTestLoop', 'collect_retrieval_features', 'itm_reranked_scores']


@torch.no_grad()
def collect_retrieval_features(model, dataloader) -> Dict[str, object]:
    """Embeddings, token states and the image -> captions index of a whole retrieval set."""
    image_tokens, image_embeds, text_hidden, text_masks, text_embeds, img2txt = [], [], [], [], [], []
    num_texts = 0
    for batch in dataloader:
        data = model.data_preprocessor(batch, False)
        feats = model.extract_feats(data['images'], data['input_ids'], data['attention_mask'])
        owner = data.get('text_to_image')
        if owner is None:
            owner = torch.arange(data['images'].shape[0], device=data['input_ids'].device)
        for i in range(data['images'].shape[0]):
            img2txt.append([num_texts + int(j) for j in (owner == i).nonzero().flatten()])
        num_texts += data['input_ids'].shape[0]
        image_tokens.append(feats['image_tokens'].cpu())
        image_embeds.append(feats['image_embeds'].cpu())
        text_hidden.append(feats['text_hidden'].cpu())
        text_masks.append(data['attention_mask'].cpu())
        text_embeds.append(feats['text_embeds'].cpu())
    length = max(h.shape[1] for h in text_hidden)
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1]) if x.dim() == 3  # noqa: E731
                                            else (0, length - x.shape[1]))
    return dict(image_tokens=torch.cat(image_tokens), image_embeds=torch.cat(image_embeds),
                text_hidden=torch.cat([pad(h) for h in text_hidden]),
                text_mask=torch.cat([pad(m) for m in text_masks]),
                text_embeds=torch.cat(text_embeds), img2txt=img2txt)


@torch.no_grad()
def itm_reranked_scores(model, feats: Dict[str, object], k: int, batch_size: int = 64):
    """(score_i2t, score_t2i): similarity top-k of every query re-scored by the ITM head."""
    if getattr(model, 'itm_head', None) is None or getattr(model, 'fusion_encoder', None) is None:
        raise RuntimeError('ITM re-ranking needs a model with fusion_encoder and itm_head '
                           '(a CODIS config whose itm_loss is not None)')
    device = next(model.parameters()).device

    def pair_scorer(image_index, text_index):
        return itm_score(model.fusion_encoder, model.itm_head,
                         feats['text_hidden'][text_index].to(device), feats['text_mask'][text_index].to(device),
                         feats['image_tokens'][image_index].to(device))

    similarity = feats['image_embeds'] @ feats['text_embeds'].T
    return itm_rerank(similarity, pair_scorer, k=k, batch_size=batch_size)


class _ITMRerankMixin:

    def _setup(self, k: int, batch_size: int) -> None:
        if k < 1 or batch_size < 1:
            raise ValueError(f'k and batch_size must be positive, got k={k}, batch_size={batch_size}')
        self.k, self.pair_batch_size = int(k), int(batch_size)

    def _whole_set_loader(self):
        """The configured loader; under torch.distributed one over the whole set, in order."""
        if not dist.is_distributed():
            return self.dataloader
        loader = self.dataloader
        return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False,
                          collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                          pin_memory=loader.pin_memory)

    def _evaluate(self) -> dict:
        model = unwrap_model(self.runner.model)
        model.eval()
        feats = collect_retrieval_features(model, self._whole_set_loader())
        score_i2t, score_t2i = itm_reranked_scores(model, feats, self.k, self.pair_batch_size)
        self.evaluator.process(data_samples=[dict(score_i2t=score_i2t, score_t2i=score_t2i,
                                                  img2txt=feats['img2txt'])], data_batch=None)
        return self.evaluator.evaluate(1)

    def run(self) -> dict:
        stage = self._stage
        self.runner.call_hook(f'before_{stage}')
        self.runner.call_hook(f'before_{stage}_epoch')
        metrics = self._evaluate()
        self.runner.call_hook(f'after_{stage}_epoch', metrics=metrics)
        self.runner.call_hook(f'after_{stage}')
        return metrics


@LOOPS.register_module()
class ITMRerankValLoop(_ITMRerankMixin, ValLoop):
    """``ValLoop`` whose retrieval scores are ITM re-ranked (see the module docstring): ``k``
    candidates re-scored per query, ``batch_size`` image-text pairs per fusion pass."""

    _stage = 'val'

    def __init__(self, runner, dataloader, evaluator, k: int = 128, batch_size: int = 64, fp16: bool = False):
        super().__init__(runner, dataloader, evaluator, fp16=fp16)
        self._setup(k, batch_size)


@LOOPS.register_module()
class ITMRerankTestLoop(_ITMRerankMixin, TestLoop):
    """``TestLoop`` whose retrieval scores are ITM re-ranked (see the module docstring)."""

    _stage = 'test'

    def __init__(self, runner, dataloader, evaluator, k: int = 128, batch_size: int = 64, fp16: bool = False):
        super().__init__(runner, dataloader, evaluator, fp16=fp16)
        self._setup(k, batch_size)
