r"""Image-text retrieval recall (TR/IR R@k) for images with several captions, as ALBEF's ``itm_eval``.

With scores ``S`` (images x texts) and every text describing exactly one image:

* **text retrieval**, one query per image ``i`` with captions ``G_i``, ranked by its best placed
  caption: :math:`r_i = |\{j \notin G_i : S_{ij} \ge \max_{g \in G_i} S_{ig}\}|`;
* **image retrieval**, one query per caption ``j`` of image ``t_j``:
  :math:`r_j = |\{i \ne t_j : S^{t2i}_{ji} \ge S^{t2i}_{j t_j}\}|` (``S^{t2i}`` defaults to
  ``S^T``; ITM re-ranking gives two different matrices);
* :math:`R@k = 100 \cdot \text{mean}(r < k)`; ``txt_r_mean``/``img_r_mean`` average over the ks,
  ``r_mean`` those two.

Ties count against the query (ALBEF leaves them to ``argsort``), so a collapsed model with all
scores equal gets chance-level recall or lower, never 100 %. :class:`RetrievalMetric` is the
mmengine metric; it prints the paper's table (TR@1/5/10 | IR@1/5/10).

Example::

    >>> import torch
    >>> score = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.7, 0.3]])   # 2 images, 3 texts
    >>> img2txt = {0: [0, 2], 1: [1]}
    >>> txt2img = {0: 0, 1: 1, 2: 0}
    >>> retrieval_recalls(score, img2txt, txt2img, ks=(1,))['txt_r1']
    100.0
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log

from vlp_codebook.registry import METRICS

__all__ = ['retrieval_recalls', 'format_retrieval_table', 'RetrievalMetric']

Scores = Union[torch.Tensor, np.ndarray]
Img2Txt = Union[Mapping[int, Sequence[int]], Sequence[Sequence[int]]]
Txt2Img = Union[Mapping[int, int], Sequence[int]]


def loaded_checkpoint_note() -> str:
    """`` (model weights from PATH)`` when the running mmengine Runner loaded a checkpoint (recorded by
    :class:`~vlp_codebook.engine.checkpoint_coverage.CheckpointCoverageHook`), else ``''``."""
    from mmengine.logging import MessageHub

    try:
        path = MessageHub.get_current_instance().get_info('loaded_checkpoint')
    except Exception:  # noqa: BLE001 - no message hub yet: nothing to add
        path = None
    return f' (model weights from {path})' if path else ''


def nonfinite_rows(values: torch.Tensor) -> List[int]:
    """Indices of the rows of a 2-D tensor that hold NaN or inf."""
    return (~torch.isfinite(values)).any(dim=1).nonzero().flatten().tolist()


def _as_scores(name: str, scores: Scores, shape: Optional[tuple] = None, source: str = '') -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().cpu()
    if not scores.is_floating_point():
        scores = scores.double()
    if scores.dim() != 2:
        raise ValueError(f'{name} must be a 2-D score matrix, got shape {tuple(scores.shape)}')
    if shape is not None and tuple(scores.shape) != shape:
        raise ValueError(f'{name} must have shape {shape}, got {tuple(scores.shape)}')
    if not torch.isfinite(scores).all():
        rows = nonfinite_rows(scores)
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(f'{name}{f" ({source})" if source else ""} contains NaN or inf scores: {bad} of '
                         f'{scores.numel()} entries, in rows {rows[:8]}{" ..." if len(rows) > 8 else ""} '
                         f'(shape {tuple(scores.shape)}){loaded_checkpoint_note()}')
    return scores


def _ground_truth(img2txt: Img2Txt, txt2img: Txt2Img, num_images: int, num_texts: int) -> torch.Tensor:
    """The (images, texts) boolean pairing matrix, after checking both mappings agree."""
    img2txt_list = [img2txt[i] for i in range(num_images)] if isinstance(img2txt, Mapping) else list(img2txt)
    txt2img_list = [txt2img[j] for j in range(num_texts)] if isinstance(txt2img, Mapping) else list(txt2img)
    if len(img2txt_list) != num_images or len(txt2img_list) != num_texts:
        raise ValueError(f'img2txt has {len(img2txt_list)} images and txt2img {len(txt2img_list)} texts, '
                         f'but the score matrix is {num_images} images x {num_texts} texts')
    pairs = torch.zeros(num_images, num_texts, dtype=torch.bool)
    for j, i in enumerate(txt2img_list):
        if not 0 <= int(i) < num_images:
            raise ValueError(f'txt2img[{j}] = {i} is not an image index in [0, {num_images})')
        pairs[int(i), j] = True
    for i, texts in enumerate(img2txt_list):
        if len(texts) == 0:
            raise ValueError(f'image {i} has no caption in img2txt')
        if sorted(int(j) for j in texts) != pairs[i].nonzero().flatten().tolist():
            raise ValueError(f'img2txt[{i}] = {list(texts)} disagrees with txt2img, which gives image {i} '
                             f'the texts {pairs[i].nonzero().flatten().tolist()}')
    return pairs


def retrieval_recalls(score_i2t: Scores, img2txt: Img2Txt, txt2img: Txt2Img,
                      ks: Sequence[int] = (1, 5, 10), score_t2i: Optional[Scores] = None,
                      source: str = '') -> Dict[str, float]:
    """TR/IR recall at each k, in percent (see the module docstring for the definition).

    Args:
        score_i2t: (N_img, N_txt) scores, higher = more similar.
        img2txt: image index -> indices of its texts (a mapping or a list of lists).
        txt2img: text index -> index of its image (a mapping or a list).
        ks: the cut-offs k.
        score_t2i: (N_txt, N_img) scores for image retrieval; default ``score_i2t.T``.
        source: where the scores come from, for error messages.

    Returns:
        ``txt_r{k}`` and ``img_r{k}`` for every k, ``txt_r_mean``, ``img_r_mean``, ``r_mean``.

    Raises:
        ValueError: wrong shapes, NaN/inf scores, mappings that disagree or leave an image without
            captions, or a k < 1.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f'ks must be positive integers, got {ks}')
    score_i2t = _as_scores('score_i2t', score_i2t, source=source)
    num_images, num_texts = score_i2t.shape
    score_t2i = score_i2t.T if score_t2i is None else _as_scores('score_t2i', score_t2i, (num_texts, num_images),
                                                                 source=source)
    pairs = _ground_truth(img2txt, txt2img, num_images, num_texts)

    best_correct = score_i2t.masked_fill(~pairs, float('-inf')).amax(dim=1, keepdim=True)
    text_ranks = ((score_i2t >= best_correct) & ~pairs).sum(dim=1)
    pairs_t = pairs.T
    correct = score_t2i[pairs_t].unsqueeze(1)  # one True per row of pairs_t: (N_txt, 1) in text order
    image_ranks = ((score_t2i >= correct) & ~pairs_t).sum(dim=1)

    result: Dict[str, float] = {}
    for k in ks:
        result[f'txt_r{k}'] = 100.0 * (text_ranks < k).double().mean().item()
    for k in ks:
        result[f'img_r{k}'] = 100.0 * (image_ranks < k).double().mean().item()
    result['txt_r_mean'] = sum(result[f'txt_r{k}'] for k in ks) / len(ks)
    result['img_r_mean'] = sum(result[f'img_r{k}'] for k in ks) / len(ks)
    result['r_mean'] = (result['txt_r_mean'] + result['img_r_mean']) / 2
    return result


def format_retrieval_table(metrics: Mapping[str, float], ks: Sequence[int] = (1, 5, 10),
                           num_images: Optional[int] = None, num_texts: Optional[int] = None) -> str:
    """The recalls as the paper's table: Text Retrieval R@ks | Image Retrieval R@ks (2 decimals)."""
    width = 8
    block = len(ks) * (width + 1) - 1
    sizes = '' if num_images is None else f': {num_images} images, {num_texts} texts'
    lines = [f'Retrieval{sizes} (r_mean {metrics["r_mean"]:.2f})',
             f'|{"Text Retrieval":^{block}}|{"Image Retrieval":^{block}}|',
             '|' + '|'.join(f'{prefix}@{k}'.center(width) for prefix in ('TR', 'IR') for k in ks) + '|',
             '|' + '|'.join(f'{metrics[f"{kind}_r{k}"]:>{width - 1}.2f} '
                            for kind in ('txt', 'img') for k in ks) + '|']
    return '\n'.join(lines)


def _get(sample: Any, key: str, default: Any = None) -> Any:
    if isinstance(sample, Mapping):
        return sample.get(key, default)
    return getattr(sample, key, default)


@METRICS.register_module()
class RetrievalMetric(BaseMetric):
    """TR/IR R@k over a retrieval set, from the model's predictions (mmengine ``BaseMetric``).

    A data sample is per image, ``dict(image_embed=(d,), text_embeds=(n_caps, d), image_id=int)``
    (pairs scored by dot product, cosine with ``normalize``), or one whole matrix (after ITM
    re-ranking) ``dict(score_i2t=(N_img, N_txt), img2txt=list[list[int]], score_t2i=optional)``,
    the same on every rank. ``k``: the cut-offs. The metrics (percent) are prefixed ``retrieval/``.

    Example (mmengine config)::

        val_evaluator = dict(type='RetrievalMetric', k=(1, 5, 10))
    """

    default_prefix: Optional[str] = 'retrieval'

    def __init__(self, k: Sequence[int] = (1, 5, 10), normalize: bool = True, collect_device: str = 'cpu',
                 prefix: Optional[str] = None, collect_dir: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix, collect_dir=collect_dir)
        self.ks = tuple(int(value) for value in k)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f'k must be positive integers, got {k}')
        self.normalize = normalize

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        for sample in data_samples:
            if _get(sample, 'score_i2t') is not None:
                score_t2i = _get(sample, 'score_t2i')
                img2txt = _get(sample, 'img2txt')
                if img2txt is None:
                    raise KeyError("a sample with 'score_i2t' also needs 'img2txt' (image -> its text indices)")
                self.results.append(dict(
                    score_i2t=torch.as_tensor(_get(sample, 'score_i2t')).detach().cpu(),
                    score_t2i=None if score_t2i is None else torch.as_tensor(score_t2i).detach().cpu(),
                    img2txt=[[int(j) for j in texts] for texts in
                             ([img2txt[i] for i in range(len(img2txt))] if isinstance(img2txt, Mapping)
                              else img2txt)]))
                continue
            missing = [key for key in ('image_embed', 'text_embeds', 'image_id') if _get(sample, key) is None]
            if missing:
                got = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
                raise KeyError(f'RetrievalMetric needs {missing} in every data sample (or a whole '
                               f"'score_i2t' matrix); got {got}")
            image_embed = torch.as_tensor(_get(sample, 'image_embed')).detach().float().cpu()
            text_embeds = torch.as_tensor(_get(sample, 'text_embeds')).detach().float().cpu()
            if text_embeds.dim() == 1:
                text_embeds = text_embeds.unsqueeze(0)
            if image_embed.dim() != 1 or text_embeds.dim() != 2 or text_embeds.shape[1] != image_embed.shape[0]:
                raise ValueError(f'image_embed must be (d,) and text_embeds (n_caps, d), got '
                                 f'{tuple(image_embed.shape)} and {tuple(text_embeds.shape)}')
            self.results.append(dict(image_embed=image_embed, text_embeds=text_embeds,
                                     image_id=int(torch.as_tensor(_get(sample, 'image_id')).item())))

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        if not results:
            raise ValueError('RetrievalMetric has no results: did the model return predictions?')
        matrix_mode = ['score_i2t' in result for result in results]
        if any(matrix_mode) and not all(matrix_mode):
            raise ValueError('data samples mix per-image embeddings and whole score matrices')
        if all(matrix_mode):
            first = results[0]
            img2txt = first['img2txt']
            txt2img = {j: i for i, texts in enumerate(img2txt) for j in texts}
            metrics = retrieval_recalls(first['score_i2t'], img2txt, txt2img, self.ks, first['score_t2i'],
                                        source='the score matrices the model passed to RetrievalMetric')
            num_images, num_texts = first['score_i2t'].shape
        else:
            seen = set()
            for result in results:
                if result['image_id'] in seen:
                    raise ValueError(f"image_id {result['image_id']} was evaluated twice; each image must "
                                     'appear once (a sampler without shuffling or repeats, e.g. DefaultSampler'
                                     '(shuffle=False))')
                seen.add(result['image_id'])
            images = torch.stack([result['image_embed'] for result in results])
            texts = torch.cat([result['text_embeds'] for result in results])
            if images.shape[1] != texts.shape[1]:
                raise ValueError(f'image embeddings have dimension {images.shape[1]}, text embeddings {texts.shape[1]}')
            for what, values, ids in (('image', images, [r['image_id'] for r in results]),
                                      ('text', texts, None)):
                rows = nonfinite_rows(values)
                if rows:
                    named = [ids[i] for i in rows[:8]] if ids else rows[:8]
                    raise ValueError(
                        f'RetrievalMetric: the model\'s {what} embeddings hold NaN or inf for {len(rows)} of '
                        f'{values.shape[0]} {what}s ({"image_id" if ids else "text index"} {named}'
                        f'{" ..." if len(rows) > 8 else ""}){loaded_checkpoint_note()}: no score can be computed')
            if self.normalize:
                images = torch.nn.functional.normalize(images, dim=1)
                texts = torch.nn.functional.normalize(texts, dim=1)
            img2txt, txt2img, start = [], [], 0
            for i, result in enumerate(results):
                count = result['text_embeds'].shape[0]
                img2txt.append(list(range(start, start + count)))
                txt2img.extend([i] * count)
                start += count
            metrics = retrieval_recalls(images @ texts.T, img2txt, txt2img, self.ks,
                                        source='similarities of the model\'s image and text embeddings')
            num_images, num_texts = images.shape[0], texts.shape[0]
        print_log('\n' + format_retrieval_table(metrics, self.ks, num_images, num_texts), logger='current')
        return metrics
