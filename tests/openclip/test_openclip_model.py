"""CodebookCLIP and CodebookClipLoss through the Python API (for users with their own loop)."""
from __future__ import annotations

import pytest
import torch


# the codebook without its plan queue and warm-up (the defaults), for tests of the terms themselves
PLAIN = dict(plan_queue_size=0, codebook_warmup_steps=0)


def _clip(seed=0):
    import open_clip
    torch.manual_seed(seed)
    model, _, _ = open_clip.create_model_and_transforms('codis-tiny-vit', output_dict=True)
    return model


def _batch(n=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(1, 49000, (n, 16), generator=generator)


def test_open_clip_interface_is_the_wrapped_models(openclip_plugin):
    from vlp_codebook_openclip import CodebookCLIP
    clip = _clip()
    model = CodebookCLIP(clip, codebook_size=32)
    assert model.logit_scale is clip.logit_scale and model.visual is clip.visual
    assert model.embed_dim == 64 and model.codebook.weight.shape == (32, 64)
    # the codebook is one of the model's parameters: open_clip's optimizer trains it
    assert any(p is model.codebook.weight for p in model.parameters())
    images, texts = _batch()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), clip.encode_image(images))


def test_loss_keeps_open_clips_term_exactly_and_adds_ours(openclip_plugin):
    import open_clip

    from vlp_codebook_openclip import CodebookCLIP, CodebookClipLoss
    model = CodebookCLIP(_clip(), codebook_size=32, **PLAIN)
    loss = CodebookClipLoss(open_clip.ClipLoss())
    out = model(*_batch())
    losses = loss(**out, output_dict=True)
    reference = open_clip.ClipLoss()(out['image_features'], out['text_features'], out['logit_scale'])
    assert torch.equal(losses['contrastive_loss'], reference)
    assert set(losses) == {'contrastive_loss', 'codebook_i2p', 'codebook_t2p', 'codebook_ot_v', 'codebook_ot_t'}
    total = loss(**out)
    assert torch.allclose(total, sum(losses.values()))
    # the codebook terms are those of CodebookOTLoss on the same features (student plans)
    direct = model.codebook_loss(out['image_features'], out['text_features'])
    assert torch.allclose(losses['codebook_i2p'], direct['loss_i2p'])


def test_eval_mode_is_open_clip_unchanged_and_moves_no_state(openclip_plugin):
    from vlp_codebook_openclip import CodebookCLIP
    model = CodebookCLIP(_clip(), codebook_size=32, intra=True, queue_size=8)
    model.eval()
    out = model(*_batch())
    assert set(out) == {'image_features', 'text_features', 'logit_scale'}
    assert model.teacher is None and model.image_queue is not None and len(model.image_queue) == 0


def test_training_step_with_locked_image_tower(openclip_plugin):
    """--lock-image: the image tower does not move, the codebook does, and the teacher's image
    features are the (frozen) student's."""
    import open_clip

    from vlp_codebook_openclip import CodebookCLIP, CodebookClipLoss
    model = CodebookCLIP(_clip(), codebook_size=32, intra=True, queue_size=8, plan_features='teacher', **PLAIN)
    model.lock_image_tower()
    visual_before = {k: v.clone() for k, v in model.clip.visual.state_dict().items()}
    codebook_before = model.codebook.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = CodebookClipLoss(open_clip.ClipLoss())
    images, texts = _batch()
    out = model(images, texts)
    assert set(out['codis_losses']) == {'codebook_i2p', 'codebook_t2p', 'codebook_ot_v', 'codebook_ot_t',
                                        'intra_i2i', 'intra_t2t'}
    sum(loss(**out, output_dict=True).values()).backward()
    optimizer.step()
    for key, value in model.clip.visual.state_dict().items():
        assert torch.equal(value, visual_before[key]), key
    assert not torch.equal(model.codebook.weight, codebook_before)
    # the teacher exists now, was not trained, and its image features for the frozen tower equal
    # the student's
    assert model.teacher is not None and not any(p.requires_grad for p in model.teacher.parameters())
    with torch.no_grad():
        teacher_image = model.teacher.module.encode_image(images, normalize=True)
        student_image = model.clip.encode_image(images, normalize=True)
    assert torch.allclose(teacher_image, student_image, atol=1e-6)
    assert len(model.image_queue) == 6 and len(model.text_queue) == 6


def test_bf16_autocast_keeps_codebook_terms_fp32(openclip_plugin):
    from vlp_codebook_openclip import CodebookCLIP
    model = CodebookCLIP(_clip(), codebook_size=32, **PLAIN)
    images, texts = _batch()
    reference = {k: v.detach() for k, v in model(images, texts)['codis_losses'].items()}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(images, texts)
    for name, value in out['codis_losses'].items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        # bf16 features (8 mantissa bits), fp32 plans and softmax: close to the fp32 run
        assert value.item() == pytest.approx(reference[name].item(), rel=0.05), name


def test_state_dict_roundtrip_builds_the_teacher(openclip_plugin):
    from vlp_codebook_openclip import CodebookCLIP
    trained = CodebookCLIP(_clip(0), codebook_size=32, intra=True, queue_size=8, **PLAIN)
    trained(*_batch())
    fresh = CodebookCLIP(_clip(1), codebook_size=32, intra=True, queue_size=8, **PLAIN)
    assert fresh.teacher is None
    fresh.load_state_dict(trained.state_dict())
    assert fresh.teacher is not None and fresh.teacher.counter('num_updates') == 1
    for key, value in trained.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert len(fresh.image_queue) == 6


@pytest.mark.parametrize('kwargs, message', [
    (dict(codebook_size=0), 'codebook_size must be a positive integer'),
    (dict(codebook_weight=-1.0), 'codebook_weight must be a finite number >= 0'),
    (dict(plan_features='momentum'), "plan_features must be one of ['student', 'teacher']"),
    (dict(intra=True), 'intra=True needs queue_size >= 1'),
    (dict(plan_queue_size=-1), 'plan_queue_size must be None or an integer >= 0, got -1'),
    (dict(codebook_warmup_steps=2.5), 'codebook_warmup_steps must be None or an integer >= 0, got 2.5'),
    (dict(codebook_kwargs=dict(warmup_steps=3)), "codebook_kwargs ['warmup_steps']: pass plan_queue_size"),
])
def test_bad_arguments_are_named(openclip_plugin, kwargs, message):
    from vlp_codebook_openclip import CodebookCLIP
    with pytest.raises(ValueError) as info:
        CodebookCLIP(_clip(), **kwargs)
    assert message in str(info.value)


def test_checkpoint_of_other_options_is_refused_with_the_flags(openclip_plugin):
    from vlp_codebook_openclip import CodebookCLIP
    source = CodebookCLIP(_clip(), codebook_size=32)
    with pytest.raises(ValueError, match='--codebook-size'):
        CodebookCLIP(_clip(), codebook_size=16).load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match='--codis-intra'):
        CodebookCLIP(_clip(), codebook_size=32, intra=True, queue_size=4).load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match='--pretrained'):
        CodebookCLIP(_clip(), codebook_size=32).load_state_dict(_clip().state_dict())


def test_lock_text_unlocked_layers_works_for_bert_towers_in_the_entry_point(openclip_plugin):
    """--lock-text-unlocked-layers 2 on a BERT HF tower: open_clip 3.3.0's architecture table lacks
    BERT's layer names; inside the entry point the last 2 layers (and the projection) train."""
    from open_clip.hf_configs import arch_dict
    from open_clip.hf_model import HFTextEncoder

    from vlp_codebook.models.encoders.pretrained import minilm_l6_dir
    from vlp_codebook_openclip.options import parse_codebook_args
    from vlp_codebook_openclip.train import injected
    before = dict(arch_dict['bert']['config_names'])
    tower = HFTextEncoder(minilm_l6_dir(), output_dim=32, proj_type='linear', pooler_type='mean_pooler',
                          pretrained=False)
    options, _ = parse_codebook_args([])
    with injected(options):
        tower.lock(unlocked_layers=2, freeze_layer_norm=True)
    trainable = {n.split('.')[3] if n.startswith('transformer.encoder.layer.') else n.split('.')[0]
                 for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable == {'4', '5', 'proj'}
    assert arch_dict['bert']['config_names'] == before          # taken back after the call


def test_codebook_init_norm_flag_reaches_the_codewords(openclip_plugin):
    from vlp_codebook_openclip import CodebookCLIP
    from vlp_codebook_openclip.options import codebook_model_kwargs, parse_codebook_args
    options, _ = parse_codebook_args(['--codebook-init-norm', '1.0', '--codebook-size', '16'])
    norms = CodebookCLIP(_clip(), **codebook_model_kwargs(options)).codebook.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones(16), atol=1e-5)
    gaussian, _ = parse_codebook_args(['--codebook-size', '16', '--codebook-init-norm', 'gaussian'])
    assert CodebookCLIP(_clip(), **codebook_model_kwargs(gaussian)).codebook.weight.norm(dim=1).min() > 3.0


def test_codewords_get_their_own_weight_decay_group_and_the_patch_is_undone(openclip_plugin):
    """open_clip 3.3.0 builds AdamW from two groups by name rules that decay the codebook; the
    entry point moves the codewords into a group with --codebook-wd, and restores open_clip_train."""
    import open_clip_train.main as oc_main

    from vlp_codebook_openclip.options import parse_codebook_args
    from vlp_codebook_openclip.train import _REPLACED, injected
    options, _ = parse_codebook_args(['--codebook-size', '16', '--codebook-wd', '0.05'])
    before = {name: getattr(oc_main, name) for name in _REPLACED}
    with injected(options):
        model, _, _ = oc_main.create_model_and_transforms('codis-tiny-vit', output_dict=True)
        named = list(model.named_parameters())
        decayed = [p for n, p in named if p.ndim >= 2 and 'logit_scale' not in n]      # open_clip's rule
        optimizer = oc_main.optim.AdamW([{'params': [p for n, p in named if p.ndim < 2], 'weight_decay': 0.0},
                                         {'params': decayed, 'weight_decay': 0.1}], lr=1e-3)
    assert {name: getattr(oc_main, name) for name in _REPLACED} == before
    groups = optimizer.param_groups
    assert [g['weight_decay'] for g in groups] == [0.0, 0.1, 0.05]
    assert groups[2]['params'] == [model.codebook.weight]
    assert not any(p is model.codebook.weight for g in groups[:2] for p in g['params'])
    assert sum(len(g['params']) for g in groups) == len(named)
    assert 'codebook_loss.codebook.weight' in model.no_weight_decay()


def test_logging_set_up_is_undone_after_the_call(openclip_plugin, tmp_path):
    """open_clip's setup_logging (called by main) sets every logger's level and adds a console
    and a file handler; the plugin quiets torch's loggers. After the call all of it is undone."""
    import logging

    import open_clip_train.main as oc_main

    from vlp_codebook_openclip.options import parse_codebook_args
    from vlp_codebook_openclip.train import injected
    torch_logger, other = logging.getLogger('torch._dynamo'), logging.getLogger('someone.else')
    other.setLevel(logging.ERROR)
    before = (logging.root.level, list(logging.root.handlers), torch_logger.level, other.level)
    options, _ = parse_codebook_args(['--codebook-size', '16'])
    with injected(options):
        oc_main.setup_logging(str(tmp_path / 'out.log'), logging.DEBUG)
        added = [h for h in logging.root.handlers if h not in before[1]]
        assert len(added) == 2 and torch_logger.level == logging.WARNING and other.level == logging.DEBUG
        logging.getLogger('made.during.the.call')
    assert (logging.root.level, logging.root.handlers, torch_logger.level, other.level) == before
    assert logging.getLogger('made.during.the.call').level == logging.NOTSET
    file_handler = next(h for h in added if isinstance(h, logging.FileHandler))
    assert file_handler.stream is None            # closed, the log file is not held open


def test_codebook_weight_zero_with_intra_is_open_clip_plus_intra_directions(openclip_plugin):
    from vlp_codebook_openclip import CodebookCLIP, CodebookClipLoss
    import open_clip
    model = CodebookCLIP(_clip(), codebook_weight=0.0, intra=True, queue_size=8)
    assert model.codebook is None and 'codebook_loss.codebook.weight' not in model.state_dict()
    out = model(*_batch())
    losses = CodebookClipLoss(open_clip.ClipLoss())(**out, output_dict=True)
    assert set(losses) == {'contrastive_loss', 'intra_i2i', 'intra_t2t'}
    sum(losses.values()).backward()
    with pytest.raises(ValueError, match='codebook_weight=0 without intra=True'):
        CodebookCLIP(_clip(), codebook_weight=0.0)


def test_plan_queue_and_warmup_flags_reach_the_loss(openclip_plugin):
    from vlp_codebook_openclip import CodebookCLIP
    from vlp_codebook_openclip.options import codebook_model_kwargs, parse_codebook_args
    options, _ = parse_codebook_args(['--codebook-size', '16', '--codebook-plan-queue', '32',
                                      '--codebook-warmup-steps', '1'])
    model = CodebookCLIP(_clip(), **codebook_model_kwargs(options))
    loss = model.codebook_loss
    assert loss.plan_queues['image'].size == 32 and loss.warmup_steps == 1
    first = model(*_batch())['codis_losses']
    assert all(v.item() == 0.0 for v in first.values())                 # the warm-up step
    second = model(*_batch(seed=2))['codis_losses']
    assert second['codebook_i2p'].item() > 0 and len(loss.plan_queues['text']) == 12


def test_defaults_are_a_plan_queue_of_k_and_a_one_epoch_warmup(openclip_plugin):
    """Without the flags: a plan queue of --codebook-size rows, and the codebook terms at zero for
    the first epoch, whose length the entry point gives (set_steps_per_epoch); without it a
    training forward says what to do instead of training with an unknown warm-up."""
    from vlp_codebook_openclip import CodebookCLIP
    from vlp_codebook_openclip.options import codebook_model_kwargs, parse_codebook_args
    options, _ = parse_codebook_args(['--codebook-size', '16'])
    model = CodebookCLIP(_clip(), **codebook_model_kwargs(options))
    loss = model.codebook_loss
    assert loss.plan_queues['image'].size == 16 and loss.plan_queues['text'].size == 16
    with pytest.raises(RuntimeError, match=r'set_steps_per_epoch\(N\)'):
        model(*_batch())
    model.eval()
    model(*_batch())                                   # evaluation needs no epoch length
    model.train()
    model.set_steps_per_epoch(2)
    assert model.alpha_warmup_steps == 2 and loss.warmup_steps == 2
    terms = [model(*_batch(seed=s))['codis_losses'] for s in range(3)]
    assert all(v.item() == 0.0 for step in terms[:2] for v in step.values())
    assert terms[2]['codebook_i2p'].item() > 0
    fixed = CodebookCLIP(_clip(), codebook_size=16, codebook_warmup_steps=1)
    fixed.set_steps_per_epoch(5)                       # an explicit warm-up stays as given
    assert fixed.codebook_loss.warmup_steps == 1 and fixed.alpha_warmup_steps == 5
    with pytest.raises(ValueError, match='steps must be a positive integer'):
        model.set_steps_per_epoch(0)
