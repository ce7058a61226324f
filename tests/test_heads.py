"""ITM (hard negatives, loss, scores, DDP) and MLM (masking, head, loss)."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from ddp_utils import init_gloo, run_workers
from vlp_codebook.models.encoders import BertFusionEncoder, BertTextEncoder, ViTImageEncoder
from vlp_codebook.models.heads import (ImageTextMatchingHead, ImageTextMatchingLoss, MaskedLanguageModelingHead,
                                       MaskedLanguageModelingLoss, itm_score, mask_tokens, sample_hard_negatives)
from vlp_codebook.registry import MODELS

D, HEADS, VOCAB = 32, 4, 60
SPECIAL = [0, 1, 2, 3, 4]            # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_ID = 4


def tiny_fusion(width=D, seed=0):
    torch.manual_seed(seed)
    return BertFusionEncoder(hidden_size=D, num_layers=1, num_heads=HEADS, encoder_width=width,
                             intermediate_size=64, dropout=0.0)


# ============================================================================ hard negatives
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), extra=st.integers(0, 6), num_ids=st.integers(1, 5))
@settings(max_examples=40)
def test_hard_negatives_never_positive_nor_same_id(seed, rows, extra, num_ids):
    g = torch.Generator().manual_seed(seed)
    cols = rows + extra
    sim = torch.randn(rows, cols, generator=g) * 5
    key_ids = torch.randint(0, num_ids, (cols,), generator=g)
    positive = torch.randperm(cols, generator=g)[:rows]
    query_ids = key_ids[positive]
    index, valid = sample_hard_negatives(sim, positive, query_ids, key_ids, generator=g)
    for i in range(rows):
        allowed = key_ids != query_ids[i]
        allowed[positive[i]] = False
        assert bool(valid[i]) == bool(allowed.any())
        if valid[i]:
            assert index[i] != positive[i] and key_ids[index[i]] != query_ids[i]


def test_hard_negative_frequencies_follow_softmax_of_allowed_keys():
    # row 0: positive at 0, key 3 shares its id; allowed keys 1, 2, 4 with logits 0, 1, 2
    sim = torch.tensor([[9.0, 0.0, 1.0, 5.0, 2.0]]).repeat(20_000, 1)
    positive = torch.zeros(20_000, dtype=torch.long)
    key_ids = torch.tensor([7, 8, 9, 7, 10])
    query_ids = torch.full((20_000,), 7)
    index, valid = sample_hard_negatives(sim, positive, query_ids, key_ids, torch.Generator().manual_seed(0))
    assert valid.all()
    counts = torch.bincount(index, minlength=5).float() / 20_000
    assert counts[0] == 0 and counts[3] == 0
    e = torch.tensor([1.0, 2.718281828, 7.389056099])
    expected = e / e.sum()                                 # 0.090, 0.245, 0.665
    torch.testing.assert_close(counts[[1, 2, 4]], expected, atol=0.012, rtol=0)
    assert counts[4] > counts[2] > counts[1]               # more similar -> picked more often


def test_hard_negatives_deterministic_and_flag_rows_without_candidates():
    sim = torch.randn(4, 4)
    ids = torch.tensor([0, 1, 1, 1])
    a = sample_hard_negatives(sim, torch.arange(4), ids, ids, torch.Generator().manual_seed(5))
    b = sample_hard_negatives(sim, torch.arange(4), ids, ids, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # allowed keys: row 0 (id 0) -> {1, 2, 3}; rows 1-3 (id 1) -> only key 0
    assert a[1].all() and (a[0][1:] == 0).all()
    single = sample_hard_negatives(torch.randn(1, 1), torch.zeros(1, dtype=torch.long))
    assert not single[1].any()


def test_hard_negatives_reject_bad_input():
    with pytest.raises(ValueError, match='NaN'):
        sample_hard_negatives(torch.tensor([[0.0, float('nan')]]), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match='both'):
        sample_hard_negatives(torch.zeros(2, 2), torch.arange(2), query_ids=torch.arange(2))


# ============================================================================ ITM loss
def steer(batch, negative_of):
    """Similarity logits under which row i's negative is column negative_of[i] with prob ~ 1."""
    sim = torch.zeros(batch, batch)
    sim[torch.arange(batch), negative_of] = 60.0
    return sim


def test_itm_loss_equals_cross_entropy_over_the_3b_pairs():
    fusion, head = tiny_fusion(width=24), ImageTextMatchingHead(D)
    text, image = torch.randn(3, 5, D), torch.randn(3, 7, 24)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    neg_text, neg_image = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    out = MODELS.build(dict(type='ImageTextMatchingLoss'))(
        fusion, head, text, mask, image, steer(3, neg_text), steer(3, neg_image), ids=torch.arange(3),
        generator=torch.Generator().manual_seed(0))
    assert set(out) == {'loss_itm'} and out['loss_itm'].dtype == torch.float32

    def logits(t_rows, i_rows):
        return head(fusion(text[t_rows], mask[t_rows], image[i_rows]))

    rows = torch.arange(3)
    all_logits = torch.cat([logits(rows, rows), logits(neg_text, rows), logits(rows, neg_image)])
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    expected = F.cross_entropy(all_logits.double(), labels)
    torch.testing.assert_close(out['loss_itm'].double(), expected, rtol=1e-5, atol=1e-6)


def test_itm_loss_drops_rows_without_negative_and_weights():
    fusion, head = tiny_fusion(), ImageTextMatchingHead(D)
    text, image, mask = torch.randn(2, 4, D), torch.randn(2, 3, D), torch.ones(2, 4)
    ids = torch.tensor([5, 5])                             # both pairs share an id: no negatives at all
    out = ImageTextMatchingLoss(loss_weight=2.0)(fusion, head, text, mask, image, torch.zeros(2, 2),
                                                 torch.zeros(2, 2), ids=ids)
    pos_logits = head(fusion(text, mask, image))
    expected = 2.0 * F.cross_entropy(pos_logits, torch.ones(2, dtype=torch.long))
    torch.testing.assert_close(out['loss_itm'], expected)


def test_itm_loss_backpropagates_into_head_and_encoders():
    torch.manual_seed(0)
    vit = ViTImageEncoder(image_size=32, patch_size=8, hidden_size=D, num_layers=1, num_heads=HEADS)
    text_enc = BertTextEncoder(vocab_size=VOCAB, hidden_size=D, num_layers=1, num_heads=HEADS)
    fusion, head = tiny_fusion(), ImageTextMatchingHead(D)
    ids = torch.randint(5, VOCAB, (4, 6))
    mask = torch.ones_like(ids)
    tokens, hidden = vit(torch.randn(4, 3, 32, 32)), text_enc(ids, mask)
    sim = torch.randn(4, 4)
    loss = ImageTextMatchingLoss()(fusion, head, hidden, mask, tokens, sim, sim.T)['loss_itm']
    loss.backward()
    for name, module in [('head', head), ('fusion', fusion), ('text', text_enc), ('vit', vit)]:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert fusion.layer[0].crossattention.self.key.weight.grad.abs().sum() > 0


def test_itm_loss_rejects_bad_shapes():
    fusion, head = tiny_fusion(), ImageTextMatchingHead(D)
    text, image, mask = torch.randn(2, 4, D), torch.randn(2, 3, D), torch.ones(2, 4)
    with pytest.raises(ValueError, match='columns'):
        ImageTextMatchingLoss()(fusion, head, text, mask, image, torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match='text_mask'):
        ImageTextMatchingLoss()(fusion, head, text, mask[:, :3], image, torch.zeros(2, 2), torch.zeros(2, 2))


def test_itm_score_is_the_positive_class():
    fusion, head = tiny_fusion(), ImageTextMatchingHead(D)
    text, image, mask = torch.randn(3, 4, D), torch.randn(3, 5, D), torch.ones(3, 4)
    logits = head(fusion(text, mask, image))
    torch.testing.assert_close(itm_score(fusion, head, text, mask, image), logits[:, 1])
    prob = itm_score(fusion, head, text, mask, image, output='prob')
    torch.testing.assert_close(prob, torch.softmax(logits, dim=1)[:, 1])
    assert ((prob > 0) & (prob < 1)).all()
    with pytest.raises(ValueError, match='output'):
        itm_score(fusion, head, text, mask, image, output='margin')


def test_itm_under_bf16_autocast_gives_fp32_loss():
    fusion, head = tiny_fusion(), ImageTextMatchingHead(D)
    text = torch.randn(4, 5, D, requires_grad=True)
    image = torch.randn(4, 3, D)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        sim = (text[:, 0] @ image[:, 0].T)
        out = ImageTextMatchingLoss()(fusion, head, text, torch.ones(4, 5), image, sim, sim.T)
    assert out['loss_itm'].dtype == torch.float32 and torch.isfinite(out['loss_itm'])
    out['loss_itm'].backward()
    assert torch.isfinite(text.grad).all() and text.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- DDP: joint keys
WORLD, LOCAL, LENGTHS = 2, 3, (4, 6)


def ddp_inputs():
    g = torch.Generator().manual_seed(0)
    n = WORLD * LOCAL
    text = torch.randn(n, max(LENGTHS), D, generator=g)
    mask = torch.zeros(n, max(LENGTHS))
    for r, length in enumerate(LENGTHS):
        mask[r * LOCAL:(r + 1) * LOCAL, :length] = 1
    mask[1, 3:] = 0
    image = torch.randn(n, 5, 24, generator=g)
    ids = torch.tensor([0, 1, 2, 2, 3, 4])                 # rows 2 and 3 (on different ranks) share an id
    # negatives cross the rank boundary; none is a positive or same-id
    neg_text, neg_image = torch.tensor([4, 5, 0, 1, 2, 3]), torch.tensor([3, 4, 5, 0, 1, 2])
    return text, mask, image, ids, steer(n, neg_text), steer(n, neg_image)


def itm_run(text, mask, image, ids, sim_i2t, sim_t2i):
    fusion = tiny_fusion(width=24, seed=1)
    head = ImageTextMatchingHead(D)          # same RNG stream after the seed: same weights everywhere
    text = text.clone().requires_grad_()
    image = image.clone().requires_grad_()
    loss = ImageTextMatchingLoss()(fusion, head, text, mask, image, sim_i2t, sim_t2i, ids=ids,
                                   generator=torch.Generator().manual_seed(0))['loss_itm']
    loss.backward()
    return dict(loss=loss.detach(), text_grad=text.grad, image_grad=image.grad,
                param_grad=torch.cat([p.grad.flatten() for p in list(fusion.parameters()) + list(head.parameters())]))


def _itm_worker(rank, world_size, port, out_dir):
    init_gloo(rank, world_size, port)
    text, mask, image, ids, sim_i2t, sim_t2i = ddp_inputs()
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    length = LENGTHS[rank]                                   # ranks hold texts of different lengths
    result = itm_run(text[rows, :length], mask[rows, :length], image[rows], ids[rows], sim_i2t[rows], sim_t2i[rows])
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))


def test_itm_two_gloo_ranks_equal_one_process_on_the_joint_batch():
    joint = itm_run(*ddp_inputs())
    with tempfile.TemporaryDirectory() as out_dir:
        run_workers(_itm_worker, WORLD, out_dir, timeout=180)
        ranks = [torch.load(os.path.join(out_dir, f'rank{r}.pt')) for r in range(WORLD)]
    # equal local batches: the mean of the ranks' losses is the joint loss
    torch.testing.assert_close(sum(r['loss'] for r in ranks) / WORLD, joint['loss'])
    # DDP averages shared-parameter gradients over ranks
    torch.testing.assert_close(sum(r['param_grad'] for r in ranks) / WORLD, joint['param_grad'], atol=1e-6, rtol=1e-4)
    # input gradients: rank r's rows receive every rank's contribution (gather_with_grad), = W x joint
    for r, res in enumerate(ranks):
        rows = slice(r * LOCAL, (r + 1) * LOCAL)
        torch.testing.assert_close(res['text_grad'] / WORLD, joint['text_grad'][rows, :LENGTHS[r]],
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(res['image_grad'] / WORLD, joint['image_grad'][rows], atol=1e-6, rtol=1e-4)


# ============================================================================ MLM masking
def batch_strategy():
    return st.tuples(st.integers(0, 10_000), st.integers(1, 6), st.integers(2, 12))


@given(batch_strategy())
@settings(max_examples=40)
def test_mask_tokens_never_touches_padding_or_special_and_labels_are_exact(args):
    seed, n, length = args
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    ids[:, 0] = 2
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[mask == 0] = 0
    original = ids.clone()
    masked, labels = mask_tokens(ids, mask, VOCAB, MASK_ID, SPECIAL, mask_prob=0.5, generator=g)
    assert torch.equal(ids, original)                        # input untouched
    special = torch.isin(ids, torch.tensor(SPECIAL))
    selected = labels != -100
    assert not (selected & (mask == 0)).any() and not (selected & special).any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])   # unselected positions keep their token
    changed = selected & (masked != ids)
    assert ((masked[changed] == MASK_ID) | ~torch.isin(masked[changed], torch.tensor(SPECIAL))).all()


def test_mask_tokens_rates_on_a_large_batch():
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    ids = torch.randint(5, vocab, (400, 64), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 48:] = 0                                          # a quarter is padding
    masked, labels = mask_tokens(ids, mask, vocab, MASK_ID, SPECIAL, generator=g)
    selected = labels != -100
    eligible = int(mask.sum())
    rate = selected.sum().item() / eligible
    assert abs(rate - 0.15) < 0.01
    n_sel = selected.sum().item()
    to_mask = (selected & (masked == MASK_ID)).sum().item() / n_sel
    unchanged = (selected & (masked == ids)).sum().item() / n_sel
    random_other = (selected & (masked != ids) & (masked != MASK_ID)).sum().item() / n_sel
    assert abs(to_mask - 0.8) < 0.02
    assert abs(random_other - 0.1) < 0.015                   # random token equal to the original: 1/995 of 10 %
    assert abs(unchanged - 0.1) < 0.015
    # determinism and the generator's effect
    again = mask_tokens(ids, mask, vocab, MASK_ID, SPECIAL, generator=torch.Generator().manual_seed(0))
    first = mask_tokens(ids, mask, vocab, MASK_ID, SPECIAL, generator=torch.Generator().manual_seed(0))
    other = mask_tokens(ids, mask, vocab, MASK_ID, SPECIAL, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert not torch.equal(first[1], other[1])


def test_mask_tokens_rejects_bad_arguments():
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)
    with pytest.raises(ValueError, match='mask_prob'):
        mask_tokens(ids, mask, VOCAB, MASK_ID, SPECIAL, mask_prob=1.5)
    with pytest.raises(ValueError, match='mask_token_id'):
        mask_tokens(ids, mask, VOCAB, VOCAB, SPECIAL)
    with pytest.raises(ValueError, match='equal shape'):
        mask_tokens(ids, mask[:, :2], VOCAB, MASK_ID, SPECIAL)


# ============================================================================ MLM head / loss
def test_mlm_head_tied_to_word_embeddings_and_loss_backprops():
    torch.manual_seed(0)
    text = BertTextEncoder(vocab_size=VOCAB, hidden_size=D, num_layers=1, num_heads=HEADS)
    fusion = tiny_fusion()
    head = MODELS.build(dict(type='MaskedLanguageModelingHead', hidden_size=D, vocab_size=VOCAB),
                        default_args=dict(tie_to=text.word_embeddings))
    assert head.decoder.weight is text.word_embeddings.weight
    ids = torch.randint(5, VOCAB, (4, 8))
    mask = torch.ones_like(ids)
    masked, labels = mask_tokens(ids, mask, VOCAB, MASK_ID, SPECIAL, mask_prob=0.5,
                                 generator=torch.Generator().manual_seed(0))
    fused = fusion(text(masked, mask), mask, torch.randn(4, 3, D))
    out = MaskedLanguageModelingLoss()(head(fused), labels)
    assert set(out) == {'loss_mlm'}
    out['loss_mlm'].backward()
    for name, module in [('head', head), ('fusion', fusion), ('text', text)]:
        assert sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None) > 0, name
    assert text.word_embeddings.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='tie_to'):
        MaskedLanguageModelingHead(D, VOCAB + 1, tie_to=text.word_embeddings)


def test_mlm_loss_is_mean_negative_log_likelihood_at_selected_positions():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[-100, 4, -100], [0, -100, 6]])
    expected = -(torch.log_softmax(logits.double(), -1)[0, 1, 4] + torch.log_softmax(logits.double(), -1)[1, 0, 0]
                 + torch.log_softmax(logits.double(), -1)[1, 2, 6]) / 3
    out = MaskedLanguageModelingLoss(loss_weight=1.0)(logits, labels)['loss_mlm']
    torch.testing.assert_close(out.double(), expected)
    # selecting first (the efficient path) gives the same number
    sel = labels != -100
    torch.testing.assert_close(MaskedLanguageModelingLoss()(logits[sel], labels[sel])['loss_mlm'], out)


def test_mlm_loss_without_selected_tokens_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    out = MaskedLanguageModelingLoss()(logits, torch.full((2, 3), -100))['loss_mlm']
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError, match='labels'):
        MaskedLanguageModelingLoss()(logits, torch.full((2, 3), 9))


def test_mlm_under_bf16_autocast_gives_fp32_loss():
    head = MaskedLanguageModelingHead(D, VOCAB)
    hidden = torch.randn(4, 6, D, requires_grad=True)
    labels = torch.randint(0, VOCAB, (4, 6))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = head(hidden)
        out = MaskedLanguageModelingLoss()(logits, labels)['loss_mlm']
    assert out.dtype == torch.float32 and torch.isfinite(out)
    reference = F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))
    torch.testing.assert_close(out, reference)
    out.backward()
    assert torch.isfinite(hidden.grad).all()


def test_mlm_head_loads_a_local_bert_masked_lm_checkpoint(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS,
                        intermediate_size=64)
    reference = BertForMaskedLM(config).eval()
    with torch.no_grad():                                    # non-trivial values to compare
        reference.cls.predictions.bias.normal_()
        reference.cls.predictions.transform.LayerNorm.weight.normal_()
    reference.save_pretrained(tmp_path)
    text = BertTextEncoder(num_layers=1, pretrained=str(tmp_path))
    head = MaskedLanguageModelingHead(D, VOCAB, tie_to=text.word_embeddings, pretrained=str(tmp_path))
    theirs = reference.state_dict()
    for name in ('transform.dense.weight', 'transform.dense.bias', 'transform.LayerNorm.weight',
                 'transform.LayerNorm.bias', 'bias'):
        assert torch.equal(head.state_dict()[name], theirs['cls.predictions.' + name]), name
    hidden = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), reference.cls(hidden))
    with pytest.raises(ValueError, match='tie_to'):
        MaskedLanguageModelingHead(D, VOCAB, pretrained=str(tmp_path))
