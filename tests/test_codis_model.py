"""CODIS assembled from configs: every ablation builds with the right parts, all loss terms by
name, teachers/queues behave, predict output feeds the metric, end-to-end train + test + resume."""
import copy
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from vlp_codebook.datasets.collate import vlp_collate
from vlp_codebook.datasets.synthetic_shapes import SyntheticShapesDataset
from vlp_codebook.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(ROOT, 'configs')
ABLATIONS = sorted(glob.glob(osp.join(CONFIGS, 'ablations', '*.py')))

# Paper-size configs shrunk to a test size: only encoder sizes, tokenizer and queue change.
TINY = dict(
    embed_dim=16,
    image_encoder=dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2),
    text_encoder=dict(vocab_size=None, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=32),
    fusion_encoder=dict(hidden_size=32, num_layers=1, num_heads=2, encoder_width=32),
    data_preprocessor=dict(tokenizer=dict(_delete_=True, type='BertTokenizerFromVocab',
                                          vocab=SyntheticShapesDataset.vocabulary()), max_length=16),
    queue_size=64,
)

ALL_TERMS = {'loss_t2i', 'loss_i2t', 'loss_i2i', 'loss_t2t', 'loss_code_i2p', 'loss_code_t2p',
             'loss_code_ot_v', 'loss_code_ot_t', 'loss_itm', 'loss_mlm'}
CODE_TERMS = {t for t in ALL_TERMS if t.startswith('loss_code_')}


def tiny_model(config=osp.join(CONFIGS, 'codis_base_pretrain.py'), **overrides):
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(dict(model=copy.deepcopy(TINY)))
    cfg.merge_from_dict(dict(model=overrides))
    torch.manual_seed(0)
    return MODELS.build(cfg.model)


def batch(n=8, split='train'):
    data = SyntheticShapesDataset(num_images=n, split=split, image_size=32)
    return vlp_collate([data[i] for i in range(n)])


def loss_terms(model, data=None):
    inputs = model.data_preprocessor(data or batch(), True)
    return model(**inputs, mode='loss')


def test_shapes_vocabulary_in_config_matches_dataset():
    cfg = Config.fromfile(osp.join(CONFIGS, '_base_', 'datasets', 'synthetic_shapes.py'))
    assert cfg.shapes_vocabulary == SyntheticShapesDataset.vocabulary()


EXPECTED = {
    # file: (directions, codebook?, plan features, codewords, codebook weight)
    'a_cross.py': (('t2i', 'i2t'), False, None, None, None),
    'b_intra_cross.py': (('t2i', 'i2t', 'i2i', 't2t'), False, None, None, None),
    'a_codebook_teacher.py': (('t2i', 'i2t'), True, 'teacher', 1024, 1.0),
    'b_codebook_student.py': (('t2i', 'i2t', 'i2i', 't2t'), True, 'student', 1024, 1.0),
    'b_codebook_teacher.py': (('t2i', 'i2t', 'i2i', 't2t'), True, 'teacher', 1024, 1.0),
    'codewords_500.py': (('t2i', 'i2t', 'i2i', 't2t'), True, 'teacher', 500, 1.0),
    'codewords_3000.py': (('t2i', 'i2t', 'i2i', 't2t'), True, 'teacher', 3000, 1.0),
    'codebook_weight_0p5x.py': (('t2i', 'i2t', 'i2i', 't2t'), True, 'teacher', 1024, 0.5),
    'codebook_weight_2x.py': (('t2i', 'i2t', 'i2i', 't2t'), True, 'teacher', 1024, 2.0),
    'ot_cost_student.py': (('t2i', 'i2t', 'i2i', 't2t'), True, 'teacher', 1024, 1.0),
    'ot_cost_off.py': (('t2i', 'i2t', 'i2i', 't2t'), True, 'teacher', 1024, 1.0),
    'codebook_gaussian_init.py': (('t2i', 'i2t', 'i2i', 't2t'), True, 'teacher', 1024, 1.0),
}
# Codebook options that differ from the base config (ot_cost_features, codeword_init_norm).
CODEBOOK_OPTIONS = {'ot_cost_student.py': ('student', 1.0), 'ot_cost_off.py': ('off', 1.0),
                    'codebook_gaussian_init.py': ('plan', None)}


def test_every_ablation_config_is_listed():
    assert sorted(osp.basename(p) for p in ABLATIONS) == sorted(EXPECTED)


@pytest.mark.parametrize('path', ABLATIONS, ids=osp.basename)
def test_ablation_builds_with_the_paper_row_components(path):
    directions, codebook, plan_feats, codewords, weight = EXPECTED[osp.basename(path)]
    model = tiny_model(path).train()
    assert model.distillation_loss.directions == directions
    terms = loss_terms(model)
    expected = {f'loss_{d}' for d in directions} | {'loss_itm', 'loss_mlm'}
    if codebook:
        assert model.codebook_plan_features == plan_feats
        assert model.codebook_loss.codebook.num_codewords == codewords
        assert model.codebook_loss.loss_weight == weight
        ot_cost, init_norm = CODEBOOK_OPTIONS.get(osp.basename(path), ('plan', 1.0))
        assert model.codebook_loss.ot_cost_features == ot_cost
        assert model.codebook_loss.codebook.init_norm == init_norm
        expected |= CODE_TERMS if ot_cost != 'off' else CODE_TERMS - {'loss_code_ot_v', 'loss_code_ot_t'}
    else:
        assert model.codebook_loss is None
        assert not any('codebook' in name for name, _ in model.named_parameters())
    assert {k for k in terms if k.startswith('loss')} == expected
    assert all(torch.isfinite(v) for v in terms.values())


def test_codebook_weight_scales_every_code_term():
    base = loss_terms(tiny_model(osp.join(CONFIGS, 'ablations', 'b_codebook_teacher.py')).train())
    double = loss_terms(tiny_model(osp.join(CONFIGS, 'ablations', 'codebook_weight_2x.py')).train())
    for term in CODE_TERMS:
        assert double[term].item() == pytest.approx(2 * base[term].item(), rel=1e-4)


def test_zero_weight_objective_is_not_built():
    model = tiny_model(itm_loss=dict(loss_weight=0.0), mlm_loss=None)
    assert model.itm_loss is None and model.itm_head is None and model.mlm_head is None
    assert model.fusion_encoder is None   # nothing needs it
    terms = loss_terms(model.train())
    assert 'loss_itm' not in terms and 'loss_mlm' not in terms


def test_plans_come_from_teacher_or_student_features():
    for plan_features in ('teacher', 'student'):
        model = tiny_model(codebook_plan_features=plan_features).train()
        seen = {}
        original = model.codebook_loss.forward

        def spy(zv, zt, pv=None, pt=None):
            seen.update(pv=pv, pt=pt)
            return original(zv, zt, pv, pt)

        model.codebook_loss.forward = spy
        loss_terms(model)
        if plan_features == 'student':
            assert seen['pv'] is None and seen['pt'] is None
        else:
            assert seen['pv'] is not None and not seen['pv'].requires_grad


def test_teachers_follow_ema_and_never_get_gradient():
    model = tiny_model().train()
    model.init_weights()
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    name, student = next(iter(model.image_tower.proj.named_parameters()))
    teacher = dict(model.image_teacher.module.proj.named_parameters())[name]
    history = [student.detach().clone()]
    assert torch.equal(teacher, history[0])          # init_weights resets teacher := student
    for _ in range(2):
        optim.zero_grad()
        terms = loss_terms(model)
        sum(v for k, v in terms.items() if k.startswith('loss')).backward()
        optim.step()
        history.append(student.detach().clone())
    assert all(not p.requires_grad for p in model.image_teacher.parameters())
    assert all(p.grad is None for p in model.image_teacher.parameters())
    # The EMA step inside each forward precedes that step's update of the student:
    # t1 = m s0 + (1 - m) s0 = s0, t2 = m t1 + (1 - m) s1.
    m = 0.995
    s0, s1, s2 = history
    assert not torch.allclose(s1, s0)
    assert torch.allclose(teacher, m * s0 + (1 - m) * s1, atol=1e-6)


def test_queues_fill_with_teacher_embeddings_and_ids():
    model = tiny_model().train()
    for _ in range(3):
        loss_terms(model)
    assert len(model.image_queue) == 24 and len(model.text_queue) == 24
    ids = model.image_queue.get_ids()
    assert ids.shape == (24,)
    assert torch.allclose(model.image_queue.features().norm(dim=1), torch.ones(24), atol=1e-5)


def test_predict_gives_per_image_embeddings_for_retrieval():
    model = tiny_model().eval()
    data = batch(4, split='test')
    inputs = model.data_preprocessor(data, False)
    outputs = model(**inputs, mode='predict')
    assert len(outputs) == 4
    for out, captions in zip(outputs, data['texts']):
        assert out['image_embed'].shape == (16,)
        assert out['text_embeds'].shape == (len(captions), 16)
    assert [o['image_id'] for o in outputs] == data['image_ids'].tolist()


def test_loss_mode_rejects_unpaired_batches():
    model = tiny_model()
    inputs = model.data_preprocessor(batch(4), True)
    inputs['input_ids'] = inputs['input_ids'][:3]
    inputs['attention_mask'] = inputs['attention_mask'][:3]
    with pytest.raises(ValueError, match='one caption per image'):
        model(**inputs, mode='loss')
    with pytest.raises(ValueError, match="mode must be"):
        model(**inputs, mode='train')


def test_unknown_component_type_lists_known_types():
    with pytest.raises(KeyError, match='Known types:.*CodebookOTLoss'):
        tiny_model(codebook_loss=dict(type='CodebookLoss'))


def test_batches_without_ids_never_share_ids_with_queued_entries():
    model = tiny_model().train()
    for _ in range(3):
        data = batch(8)
        del data['image_ids']
        loss_terms(model, data)
    ids = model.image_queue.get_ids()
    assert len(set(ids.tolist())) == 24 and (ids < 0).all()


def test_itm_negatives_option():
    with pytest.raises(ValueError, match="itm_negatives must be 'in_rank'"):
        tiny_model(itm_negatives='global')
    # In one process the rank's batch is the joint batch: both options draw the same negatives.
    losses = {}
    for option in ('in_rank', 'all_ranks'):
        model = tiny_model(itm_negatives=option).train()
        assert model.itm_negatives == option
        torch.manual_seed(3)
        losses[option] = loss_terms(model)['loss_itm']
    torch.testing.assert_close(losses['in_rank'], losses['all_ranks'])


def test_step_counters_restore_from_a_state_dict_and_drive_the_alpha_ramp():
    model = tiny_model(alpha_warmup_iters=4).train()
    for _ in range(3):
        loss_terms(model)
    assert model.counter('num_steps') == int(model.num_steps) == 3
    assert model.current_alpha() == pytest.approx(0.4 * 3 / 4)
    restored = tiny_model(alpha_warmup_iters=4).train()
    restored.load_state_dict(model.state_dict())
    # the host-side copies (no device read per step) follow the loaded buffers ...
    assert restored.counter('num_steps') == 3
    assert restored.counter('num_anonymous_ids') == int(model.num_anonymous_ids)
    assert restored.image_teacher.counter('num_updates') == 3
    assert len(restored.image_queue) == len(model.image_queue)
    assert restored.current_alpha() == pytest.approx(0.4 * 3 / 4)
    # ... and count on from them
    loss_terms(restored)
    assert int(restored.num_steps) == 4 and restored.current_alpha() == pytest.approx(0.4)
