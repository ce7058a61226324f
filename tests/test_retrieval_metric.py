"""RetrievalMetric / retrieval_recalls against rankings worked out by hand."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from vlp_codebook.evaluation.retrieval import RetrievalMetric, format_retrieval_table, retrieval_recalls
from vlp_codebook.registry import METRICS

# 3 images, 6 texts: image 0 <- texts 0, 1; image 1 <- text 2; image 2 <- texts 3, 4, 5.
SCORES = torch.tensor([
    #  t0   t1   t2   t3   t4   t5
    [0.1, 0.9, 0.8, 0.2, 0.0, 0.3],  # i0
    [0.7, 0.1, 0.5, 0.6, 0.2, 0.0],  # i1
    [0.4, 0.3, 0.2, 0.1, 0.9, 0.6],  # i2
])
IMG2TXT = {0: [0, 1], 1: [2], 2: [3, 4, 5]}
TXT2IMG = {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 2}
# Text retrieval, rank = wrong texts scoring >= the best correct one:
#   i0: best correct t1 = 0.9 (t0 = 0.1 is ranked last, but ANY caption counts) -> rank 0
#   i1: correct t2 = 0.5 < t0 0.7, t3 0.6                                       -> rank 2
#   i2: best correct t4 = 0.9                                                    -> rank 0
# Image retrieval (columns), rank = wrong images scoring >= the correct one:
#   t0: 0.1 vs 0.7, 0.4 -> 2;  t1: 0.9 -> 0;  t2: 0.5 vs 0.8 -> 1;
#   t3: 0.1 vs 0.2, 0.6 -> 2;  t4: 0.9 -> 0;  t5: 0.6 -> 0
EXPECTED_K123 = {
    'txt_r1': 200 / 3, 'txt_r2': 200 / 3, 'txt_r3': 100.0,
    'img_r1': 50.0, 'img_r2': 400 / 6, 'img_r3': 100.0,
}
EXPECTED_K123['txt_r_mean'] = (200 / 3 + 200 / 3 + 100) / 3
EXPECTED_K123['img_r_mean'] = (50 + 400 / 6 + 100) / 3
EXPECTED_K123['r_mean'] = (EXPECTED_K123['txt_r_mean'] + EXPECTED_K123['img_r_mean']) / 2


def assert_metrics(actual, expected):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value), key


def test_hand_computed_multi_caption_recalls():
    assert_metrics(retrieval_recalls(SCORES, IMG2TXT, TXT2IMG, ks=(1, 2, 3)), EXPECTED_K123)


def test_default_ks_and_list_mappings():
    result = retrieval_recalls(SCORES.numpy(), [[0, 1], [2], [3, 4, 5]], [0, 0, 1, 2, 2, 2])
    # With only 3 images / 6 texts every k >= 3 is a hit for every query.
    assert result['txt_r1'] == pytest.approx(200 / 3) and result['img_r1'] == pytest.approx(50.0)
    assert result['txt_r5'] == result['txt_r10'] == result['img_r5'] == result['img_r10'] == 100.0
    assert sorted(result) == ['img_r1', 'img_r10', 'img_r5', 'img_r_mean', 'r_mean',
                              'txt_r1', 'txt_r10', 'txt_r5', 'txt_r_mean']


def test_ties_count_against_the_query():
    # All scores equal (a collapsed model): every wrong candidate ties with the correct one.
    # 2 images x 2 texts: each query has 1 wrong candidate tied -> rank 1: R@1 = 0, R@2 = 100.
    flat = torch.zeros(2, 2)
    result = retrieval_recalls(flat, [[0], [1]], [0, 1], ks=(1, 2))
    assert result['txt_r1'] == 0.0 and result['img_r1'] == 0.0
    assert result['txt_r2'] == 100.0 and result['img_r2'] == 100.0


def test_tie_between_two_correct_captions_is_not_a_miss():
    # Image 0 owns texts 0 and 1, tied at 0.5; the wrong text 2 scores 0.4 -> rank 0.
    # Image 1 owns text 2 (0.9) and has wrong texts 0, 1 at 0.9 and 0.1 -> tie -> rank 1.
    scores = torch.tensor([[0.5, 0.5, 0.4], [0.9, 0.1, 0.9]])
    result = retrieval_recalls(scores, [[0, 1], [2]], [0, 0, 1], ks=(1,))
    assert result['txt_r1'] == 50.0


def test_separate_t2i_scores_change_image_retrieval_only():
    # Reversing every column of S^T makes the correct image last for every text with distinct scores.
    score_t2i = -SCORES.T
    result = retrieval_recalls(SCORES, IMG2TXT, TXT2IMG, ks=(1, 2, 3), score_t2i=score_t2i)
    assert result['txt_r1'] == pytest.approx(EXPECTED_K123['txt_r1'])
    # Negated columns: t0 -> 0 (0.1 is now the best), t1 -> 2, t2 -> 1 (0.5 vs -0.8,-0.2: -0.2 >= -0.5),
    # t3 -> 0, t4 -> 2, t5 -> 2 (-0.6 vs -0.3, 0.0).
    assert result['img_r1'] == pytest.approx(200 / 6)
    assert result['img_r2'] == pytest.approx(300 / 6)


def _reference_ranks(scores, txt2img):
    """Independent implementation: stable sorts where wrong candidates go before tied correct ones."""
    scores = np.asarray(scores, dtype=np.float64)
    num_images, num_texts = scores.shape
    text_ranks = []
    for i in range(num_images):
        order = sorted(range(num_texts), key=lambda j: (-scores[i, j], txt2img[j] == i))
        text_ranks.append(min(order.index(j) for j in range(num_texts) if txt2img[j] == i))
    image_ranks = []
    for j in range(num_texts):
        order = sorted(range(num_images), key=lambda i: (-scores[i, j], i == txt2img[j]))
        image_ranks.append(order.index(txt2img[j]))
    return np.array(text_ranks), np.array(image_ranks)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_matches_an_independent_sorting_implementation(data):
    num_images = data.draw(st.integers(1, 6))
    # every image gets >= 1 caption, extra captions to random images
    extra = data.draw(st.lists(st.integers(0, num_images - 1), max_size=8))
    txt2img = sorted(list(range(num_images)) + extra)
    num_texts = len(txt2img)
    # small integer scores: many ties
    values = data.draw(st.lists(st.integers(-2, 2), min_size=num_images * num_texts,
                                max_size=num_images * num_texts))
    scores = np.array(values, dtype=np.float64).reshape(num_images, num_texts)
    img2txt = [[j for j in range(num_texts) if txt2img[j] == i] for i in range(num_images)]
    ks = (1, 2, 5)
    text_ranks, image_ranks = _reference_ranks(scores, txt2img)
    result = retrieval_recalls(scores, img2txt, txt2img, ks)
    for k in ks:
        assert result[f'txt_r{k}'] == pytest.approx(100 * np.mean(text_ranks < k))
        assert result[f'img_r{k}'] == pytest.approx(100 * np.mean(image_ranks < k))


@pytest.mark.parametrize('kwargs, message', [
    (dict(score_i2t=torch.full((3, 6), float('nan'))), 'NaN'),
    (dict(score_i2t=torch.zeros(3)), '2-D'),
    (dict(img2txt={0: [0], 1: [2], 2: [3, 4, 5]}), 'disagrees'),
    (dict(txt2img={0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 7}), 'txt2img'),
    (dict(ks=(0, 1)), 'positive'),
    (dict(score_t2i=torch.zeros(3, 6)), 'score_t2i'),
])
def test_bad_inputs_are_named(kwargs, message):
    args = dict(score_i2t=SCORES, img2txt=IMG2TXT, txt2img=TXT2IMG, ks=(1,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        retrieval_recalls(**args)


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match='image 1 has no caption'):
        retrieval_recalls(torch.zeros(2, 2), [[0, 1], []], [0, 0])


def _embedding_samples(scores):
    """Per-image samples whose dot products reproduce ``scores`` exactly (normalize=False).

    Image i is the one-hot e_i; text j is the column scores[:, j].
    """
    samples = []
    for i, texts in IMG2TXT.items():
        samples.append(dict(image_embed=torch.eye(3)[i], text_embeds=scores[:, texts].T.clone(), image_id=i))
    return samples


def test_metric_on_per_image_embeddings():
    metric = METRICS.build(dict(type='RetrievalMetric', k=(1, 2, 3), normalize=False))
    samples = _embedding_samples(SCORES)
    metric.process({}, samples[:2])
    metric.process({}, samples[2:])
    assert_metrics(metric.compute_metrics(metric.results), EXPECTED_K123)


def test_metric_evaluate_prefixes_and_resets():
    metric = RetrievalMetric(k=(1, 2, 3), normalize=False)
    metric.process({}, _embedding_samples(SCORES))
    result = metric.evaluate(size=3)
    assert result['retrieval/txt_r1'] == pytest.approx(200 / 3)
    assert result['retrieval/r_mean'] == pytest.approx(EXPECTED_K123['r_mean'])
    assert metric.results == []


def test_normalize_turns_dot_products_into_cosines():
    # Image 0 = (1, 0) owns caption (0.6, 0.8): dot 0.6, cosine 0.6.
    # Image 1 = (0, 1) owns caption (0.1, 0.0): with image 0, dot 0.1 but cosine 1.0.
    # Text retrieval of image 0: dot 0.6 > 0.1 -> hit; cosine 0.6 < 1.0 -> miss.
    # Text retrieval of image 1: (0.8 vs 0.0) in both -> miss.  So TR@1 = 50 (dot) vs 0 (cosine).
    samples = [dict(image_embed=torch.tensor([1.0, 0.0]), text_embeds=torch.tensor([[0.6, 0.8]]), image_id=0),
               dict(image_embed=torch.tensor([0.0, 1.0]), text_embeds=torch.tensor([[0.1, 0.0]]), image_id=1)]
    dot = RetrievalMetric(k=(1,), normalize=False)
    dot.process({}, samples)
    cosine = RetrievalMetric(k=(1,), normalize=True)
    cosine.process({}, samples)
    assert dot.compute_metrics(dot.results)['txt_r1'] == 50.0
    assert cosine.compute_metrics(cosine.results)['txt_r1'] == 0.0


def test_metric_on_a_precomputed_matrix():
    metric = RetrievalMetric(k=(1, 2, 3))
    metric.process({}, [dict(score_i2t=SCORES, img2txt=[[0, 1], [2], [3, 4, 5]])])
    assert_metrics(metric.compute_metrics(metric.results), EXPECTED_K123)


@pytest.mark.parametrize('sample, error, message', [
    (dict(image_embed=torch.zeros(4), image_id=0), KeyError, 'text_embeds'),
    (dict(image_embed=torch.zeros(4), text_embeds=torch.zeros(2, 3), image_id=0), ValueError, r'\(d,\)'),
    (dict(score_i2t=torch.zeros(2, 2)), KeyError, 'img2txt'),
])
def test_metric_bad_samples(sample, error, message):
    with pytest.raises(error, match=message):
        RetrievalMetric().process({}, [sample])


def test_metric_rejects_an_image_evaluated_twice():
    metric = RetrievalMetric()
    sample = dict(image_embed=torch.ones(4), text_embeds=torch.ones(2, 4), image_id=5)
    metric.process({}, [sample, dict(sample)])
    with pytest.raises(ValueError, match='image_id 5 was evaluated twice'):
        metric.compute_metrics(metric.results)


def test_table_layout():
    table = format_retrieval_table(retrieval_recalls(SCORES, IMG2TXT, TXT2IMG, (1, 5, 10)), (1, 5, 10), 3, 6)
    lines = table.splitlines()
    # txt mean (66.67 + 100 + 100) / 3 = 88.89, img mean (50 + 100 + 100) / 3 = 83.33
    assert lines[0] == 'Retrieval: 3 images, 6 texts (r_mean 86.11)'
    assert 'Text Retrieval' in lines[1] and 'Image Retrieval' in lines[1]
    assert lines[1].index('Text Retrieval') < lines[1].index('Image Retrieval')
    assert lines[2].split('|')[1:-1] == [c.center(8) for c in ('TR@1', 'TR@5', 'TR@10', 'IR@1', 'IR@5', 'IR@10')]
    assert [float(v) for v in lines[3].split('|')[1:-1]] == [66.67, 100.0, 100.0, 50.0, 100.0, 100.0]
    assert len({len(line) for line in lines[1:]}) == 1  # columns align


def test_compute_metrics_logs_the_table(monkeypatch):
    logged = []
    monkeypatch.setattr('vlp_codebook.evaluation.retrieval.print_log',
                        lambda message, logger=None: logged.append(message))
    metric = RetrievalMetric(k=(1, 5, 10), normalize=False)
    metric.process({}, _embedding_samples(SCORES))
    metric.compute_metrics(metric.results)
    assert len(logged) == 1 and 'TR@1' in logged[0] and '|  66.67 |' in logged[0]


# ---- DDP: two gloo processes give the numbers of one process on the whole set -------------------

def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _ddp_worker(rank, world_size, port, samples, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch_dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        metric = RetrievalMetric(k=(1, 2, 3), normalize=False)
        # mmengine's DefaultSampler(shuffle=False) gives rank r the items r, r + W, ... and pads
        # the last round with items from the start; collect_results drops the padding.
        padded = samples + samples[:(-len(samples)) % world_size]
        metric.process({}, padded[rank::world_size])
        result = metric.evaluate(size=len(samples))
        torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        torch_dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path):
    samples = _embedding_samples(SCORES)
    mp.spawn(_ddp_worker, args=(2, _free_port(), samples, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f'rank{rank}.pt')
        for key, value in EXPECTED_K123.items():
            assert math.isclose(result[f'retrieval/{key}'], value, rel_tol=1e-9), (rank, key)


# ---- ITM re-ranking --------------------------------------------------------------------------------

def test_itm_rerank_scores_only_the_top_k_pairs():
    from vlp_codebook.evaluation import itm_rerank
    sim = torch.tensor([[0.9, 0.8, 0.1],
                        [0.2, 0.7, 0.6]])
    itm = torch.tensor([[1.0, 3.0, 9.0],
                        [2.0, 4.0, 5.0]])
    calls = []

    def scorer(images, texts):
        calls.extend(zip(images.tolist(), texts.tolist()))
        return itm[images, texts]

    score_i2t, score_t2i = itm_rerank(sim, scorer, k=2, batch_size=3)
    # i2t: image 0's top-2 texts are 0, 1; image 1's are 1, 2.  t2i: k = 2 covers both images.
    assert sorted(set(calls)) == sorted({(0, 0), (0, 1), (1, 1), (1, 2), (0, 2), (1, 0)})
    assert len(calls) == 2 * 2 + 3 * 2
    # Text 2 (ITM 9 for image 0) is outside image 0's top 2: it gets the floor, below ITM 1 and 3.
    assert score_i2t[0, :2].tolist() == [1.0, 3.0] and score_i2t[0, 2] < 1.0
    assert score_i2t[1, 1:].tolist() == [4.0, 5.0] and score_i2t[1, 0] < 4.0
    assert torch.equal(score_t2i, itm.T)  # every image is in every text's top 2
    # add_similarity: ITM + similarity on the re-scored pairs
    score_i2t, _ = itm_rerank(sim, scorer, k=2, add_similarity=True)
    assert score_i2t[0, :2].tolist() == pytest.approx([1.9, 3.8])
    # Re-ranking fixes the order inside the top k. Ground truth: image 0 <-> text 1, image 1 <-> texts 2, 0.
    # Similarity: image 0 prefers wrong text 0 (0.9 > 0.8), image 1 wrong text 1 (0.7 > 0.6): TR@1 = 0.
    # ITM on the top 2: image 0 -> text 1 (3 > 1), image 1 -> text 2 (5 > 4): TR@1 = 100.
    score_i2t, score_t2i = itm_rerank(sim, scorer, k=2)
    before = retrieval_recalls(sim, [[1], [2, 0]], [1, 0, 1], ks=(1,))
    after = retrieval_recalls(score_i2t, [[1], [2, 0]], [1, 0, 1], ks=(1,), score_t2i=score_t2i)
    assert before['txt_r1'] == 0.0 and after['txt_r1'] == 100.0


def test_itm_rerank_bad_inputs():
    from vlp_codebook.evaluation import itm_rerank
    with pytest.raises(ValueError, match='NaN'):
        itm_rerank(torch.zeros(2, 2), lambda i, j: torch.full((i.numel(),), float('nan')), k=1)
    with pytest.raises(ValueError, match='returned 1 scores for 2 pairs'):
        itm_rerank(torch.zeros(2, 2), lambda i, j: torch.zeros(1), k=1)
    with pytest.raises(ValueError, match='2-D'):
        itm_rerank(torch.zeros(3), lambda i, j: torch.zeros(i.numel()), k=1)
