"""The CODIS terms on LAVIS's ALBEF/BLIP: right features, LAVIS's losses unchanged, checkpoints load."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from lavis_helpers import retrieval_samples

CODE_TERMS = {'loss_code_i2p', 'loss_code_t2p', 'loss_code_ot_v', 'loss_code_ot_t'}


def tiny_cfg(cls, model_type='tiny', **overrides):
    return OmegaConf.merge(OmegaConf.load(cls.default_config_path(model_type)).model, overrides)


def plain_lavis_class(lavis_cls, tokenizer_fn):
    """LAVIS's own class, with only the tokenizer made offline (its state dict is LAVIS's)."""
    return type(f'Offline{lavis_cls.__name__}', (lavis_cls,), {'init_tokenizer': lambda self: tokenizer_fn()})


@pytest.mark.parametrize('arch', ['codis_retrieval', 'codis_blip_retrieval'])
def test_features_are_lavis_own(lavis_plugin, arch):
    """The features the mixin scores reproduce LAVIS's similarity logits of the same forward."""
    model = lavis_plugin.MODEL_NAMES[arch].from_config(tiny_cfg(lavis_plugin.MODEL_NAMES[arch]))
    samples = retrieval_samples()
    out = model(samples)
    feats = model.codis_features(out.intermediate_output)
    bs = samples['image'].shape[0]
    temp = model.temp.detach()
    if arch == 'codis_retrieval':
        # ALBEF: sim_i2t = image_feat @ [text_feat_m; queue] / temp, sim_t2i likewise
        torch.testing.assert_close(out.sims.sim_i2t[:, :bs], feats['image_feat'] @ feats['text_feat_m'].T / temp)
        torch.testing.assert_close(out.sims.sim_t2i[:, :bs], feats['text_feat'] @ feats['image_feat_m'].T / temp)
    else:
        # BLIP keeps the in-batch student similarities (its hard-negative weights) in sims
        torch.testing.assert_close(out.sims.sim_i2t, feats['image_feat'] @ feats['text_feat'].T / temp)
    torch.testing.assert_close(out.sims.sim_i2t_m[:, :bs], feats['image_feat_m'] @ feats['text_feat_m'].T / temp)
    for name, f in feats.items():
        torch.testing.assert_close(f.norm(dim=1), torch.ones(bs), msg=name)
    assert feats['image_feat'].requires_grad and not feats['image_feat_m'].requires_grad


@pytest.mark.parametrize('arch,lavis_name', [('codis_retrieval', 'AlbefRetrieval'),
                                             ('codis_blip_retrieval', 'BlipRetrieval'),
                                             ('codis_pretrain', 'AlbefPretrain')])
def test_lavis_losses_unchanged_and_terms_added(lavis_plugin, arch, lavis_name):
    cls = lavis_plugin.MODEL_NAMES[arch]
    model = cls.from_config(tiny_cfg(cls))
    lavis_cls = next(c for c in cls.__mro__ if c.__name__ == lavis_name)
    twin = copy.deepcopy(model)
    samples = retrieval_samples()
    torch.manual_seed(1)   # ITM negatives and MLM masks are sampled
    out = model(samples)
    torch.manual_seed(1)
    reference = lavis_cls.forward(twin, samples)      # LAVIS's forward, same weights and queue
    for name in ('loss_itc', 'loss_itm', 'loss_mlm'):
        if getattr(reference, name, None) is not None:
            torch.testing.assert_close(getattr(out, name), getattr(reference, name), msg=name)
    keys = set(out.keys())
    assert CODE_TERMS | {'loss_code'} <= keys
    extra = [out[k] for k in keys if k in CODE_TERMS or k in ('loss_i2i', 'loss_t2t')]
    torch.testing.assert_close(out.loss, reference.loss + sum(extra))
    torch.testing.assert_close(out.loss_code, sum(out[k] for k in CODE_TERMS))
    assert isinstance(out, type(reference))            # still an AlbefOutput / BlipOutput
    if arch == 'codis_pretrain':                       # its tiny config enables the intra terms
        assert {'loss_i2i', 'loss_t2t'} <= keys


def test_codebook_gets_gradient_and_plans_come_from_the_teacher(lavis_plugin):
    cls = lavis_plugin.CodisRetrieval
    model = cls.from_config(tiny_cfg(cls))
    samples = retrieval_samples()
    out = model(samples)
    out.loss.backward()
    grad = model.codebook_loss.codebook.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert model.vision_proj.weight.grad.abs().sum() > 0

    # A teacher far from the student (as late in training): the terms are those of the plans
    # of the momentum features, not of the student features ("teacher feature" ablation).
    with torch.no_grad():
        for proj in (model.vision_proj_m, model.text_proj_m):
            proj.weight.copy_(torch.randn_like(proj.weight))
    model.momentum = 1.0           # keep the teacher where it is during the forward
    model.eval()
    with torch.no_grad():
        out = model(samples)
        feats = model.codis_features(out.intermediate_output)
        loss_fn = model.codebook_loss
        from_teacher = loss_fn(feats['image_feat'], feats['text_feat'],
                               image_plan_feats=feats['image_feat_m'], text_plan_feats=feats['text_feat_m'])
        from_student = loss_fn(feats['image_feat'], feats['text_feat'])
    for key, value in from_teacher.items():
        torch.testing.assert_close(out['loss_code_' + key[len('loss_'):]], value, msg=key)
    assert not torch.allclose(from_teacher['loss_ot_v'], from_student['loss_ot_v'])
    model.codebook_plan_features = 'student'
    with torch.no_grad():
        student_out = model(samples)
    torch.testing.assert_close(student_out.loss_code_ot_v, from_student['loss_ot_v'])


def test_intra_modal_terms_use_own_queues(lavis_plugin):
    cls = lavis_plugin.CodisRetrieval
    model = cls.from_config(tiny_cfg(cls, intra_modal_loss={'queue_size': 6}))
    assert model.codis_image_queue.size == 6 and model.codis_image_queue.with_ids
    samples = retrieval_samples()
    out = model(samples)
    assert {'loss_i2i', 'loss_t2t'} <= set(out.keys())
    # our queues got this batch's momentum features after the loss, with the image ids
    feats = model.codis_features(out.intermediate_output)
    torch.testing.assert_close(model.codis_image_queue.features(), feats['image_feat_m'])
    assert model.codis_text_queue.get_ids().tolist() == samples['image_id'].tolist()
    # LAVIS's own queue advanced too, independently (queue_size 8, batch 4)
    assert int(model.queue_ptr) == 4
    # LAVIS's learnable temperature is shared: it gets gradient from the intra terms alone
    model.zero_grad()
    (out.loss_i2i + out.loss_t2t).backward()
    assert model.temp.grad is not None and model.temp.grad.abs() > 0
    assert not any(p.requires_grad for p in model.intra_modal_loss.parameters())


@pytest.mark.parametrize('arch,lavis_name,tokenizer', [
    ('codis_retrieval', 'AlbefRetrieval', 'plain'),
    ('codis_blip_retrieval', 'BlipRetrieval', 'blip'),
])
def test_lavis_state_dict_loads_with_only_codis_keys_missing(lavis_plugin, tmp_path, arch, lavis_name, tokenizer):
    from lavis.models import albef_models, blip_models  # noqa: F401
    from vlp_codebook_lavis.encoders import (add_blip_special_tokens, build_vision_encoder, build_xbert_encoder,
                                             load_bert_tokenizer)
    cls = lavis_plugin.MODEL_NAMES[arch]
    cfg = tiny_cfg(cls)
    lavis_cls = next(c for c in cls.__mro__ if c.__name__ == lavis_name)
    make_tok = (lambda: load_bert_tokenizer()) if tokenizer == 'plain' else \
        (lambda: add_blip_special_tokens(load_bert_tokenizer()))
    plain = plain_lavis_class(lavis_cls, make_tok)(
        image_encoder=build_vision_encoder(cfg), text_encoder=build_xbert_encoder(cfg),
        queue_size=cfg.queue_size, embed_dim=cfg.embed_dim)
    lavis_state = plain.state_dict()

    codis = cls.from_config(cfg)
    fresh_codebook = codis.codebook_loss.codebook.weight.detach().clone()
    msg = codis.load_state_dict(lavis_state, strict=False)
    assert msg.unexpected_keys == []
    assert set(msg.missing_keys) == codis.codis_state_keys() == {
        'codebook_loss.codebook.weight', 'codebook_loss.codebook.usage'}
    for key, value in lavis_state.items():
        torch.testing.assert_close(codis.state_dict()[key], value, msg=key)
    torch.testing.assert_close(codis.codebook_loss.codebook.weight, fresh_codebook)

    # the same through LAVIS's checkpoint switches, from a file on disk (no network)
    path = tmp_path / f'{lavis_name}.pth'
    torch.save({'model': lavis_state}, path)
    for switch in ({'load_finetuned': True, 'finetuned': str(path)},
                   {'load_pretrained': True, 'pretrained': str(path)}):
        loaded = cls.from_config(OmegaConf.merge(cfg, switch))
        torch.testing.assert_close(loaded.text_proj.weight, plain.text_proj.weight)
        torch.testing.assert_close(loaded.visual_encoder.pos_embed, plain.visual_encoder.pos_embed)


@pytest.mark.parametrize('switch', ['finetuned', 'pretrained'])
def test_lavis_checkpoint_switches_read_against_the_schema(lavis_plugin, tmp_path, switch):
    """``finetuned:`` / ``pretrained:`` of a codis_* model go through LAVIS's loader with its
    ``torch.load`` reading as data: a file torch's weights_only accepts but no checkpoint of ours
    holds (a set) is refused, naming the file; the same weights without it load."""
    from vlp_codebook.checkpoint_io import UntrustedCheckpointError
    cls = lavis_plugin.MODEL_NAMES['codis_retrieval']
    cfg = tiny_cfg(cls)
    state = cls.from_config(cfg).state_dict()
    foreign, plain = tmp_path / 'foreign.pth', tmp_path / 'plain.pth'
    torch.save({'model': state, 'seen': {1, 2}}, foreign)
    torch.save({'model': state}, plain)
    with pytest.raises(UntrustedCheckpointError) as error:
        cls.from_config(OmegaConf.merge(cfg, {f'load_{switch}': True, switch: str(foreign)}))
    assert 'builtins.set' in str(error.value) and str(foreign) in str(error.value)
    loaded = cls.from_config(OmegaConf.merge(cfg, {f'load_{switch}': True, switch: str(plain)}))
    torch.testing.assert_close(loaded.text_proj.weight, state['text_proj.weight'])


@pytest.mark.parametrize('arch', ['codis_retrieval', 'codis_blip_retrieval', 'codis_pretrain'])
def test_codebook_block_options_reach_the_loss(lavis_plugin, arch):
    """The shipped YAMLs use the measured defaults; a `codebook_loss:` block can switch them."""
    cls = lavis_plugin.MODEL_NAMES[arch]
    model = cls.from_config(tiny_cfg(cls))
    assert model.codebook_loss.ot_cost_features == 'plan'
    assert model.codebook_loss.codebook.init_norm == 1.0
    torch.testing.assert_close(model.codebook_loss.codebook.weight.norm(dim=1),
                               torch.ones(model.codebook_loss.codebook.num_codewords))
    changed = cls.from_config(tiny_cfg(cls, codebook_loss=dict(ot_cost_features='student', codeword_init_norm=None)))
    assert changed.codebook_loss.ot_cost_features == 'student'
    assert changed.codebook_loss.codebook.init_norm is None
    assert changed.codebook_loss.codebook.weight.norm(dim=1).min() > 2.0     # N(0, 1) rows: ~sqrt(d)
