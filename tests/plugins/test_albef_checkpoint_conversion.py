"""An ALBEF checkpoint converted by ``vlp_codebook.tools.convert_albef`` makes a core CODIS compute
what the ALBEF model computes: LAVIS's ALBEF-architecture models (``codis_pretrain``: the ALBEF
repository's layout with ``text_encoder.bert.`` and an MLM head; ``codis_retrieval``: LAVIS's
``text_encoder.`` layout without one) are the independent reference."""
from __future__ import annotations

import os.path as osp

import pytest
import torch
from torch.nn import functional as F

from vlp_codebook.models.encoders.pretrained import minilm_l6_dir
from vlp_codebook.checkpoint_io import read_checkpoint
from vlp_codebook.registry import MODELS
from vlp_codebook.tools import convert_albef

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BASE = osp.join(ROOT, 'configs', 'codis_base_pretrain.py')

# The sizes of the plugin's tiny LAVIS models (configs/models/*_tiny.yaml, med_config_tiny_albef.json).
TINY_CODIS = """
_base_ = [{base!r}]
model = dict(
    embed_dim=16, queue_size=8,
    image_encoder=dict(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2),
    text_encoder=dict(vocab_size=30522, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      max_position_embeddings=64),
    fusion_encoder=dict(hidden_size=32, num_layers=1, num_heads=2, encoder_width=32, intermediate_size=64),
    data_preprocessor=dict(tokenizer=dict(_delete_=True, type='PretrainedTokenizer', path={vocab!r}), max_length=16),
    codebook_loss=dict(num_codewords=16),
)
"""


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / 'tiny_codis.py'
    path.write_text(TINY_CODIS.format(base=BASE, vocab=minilm_l6_dir()))
    return str(path)


def _albef(lavis_plugin, name):
    from lavis.models import load_model
    model = load_model(name, 'tiny').eval()
    torch.manual_seed(0)
    with torch.no_grad():
        # LAVIS starts the momentum copies equal to the students: make them differ, so a teacher
        # loaded from the student's weights would be caught.
        for key, param in model.named_parameters():
            if '_m.' in key:
                param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.mark.parametrize('name', ['codis_pretrain', 'codis_retrieval'])
def test_converted_albef_computes_the_albef_features(lavis_plugin, name, tiny_config, tmp_path):
    albef = _albef(lavis_plugin, name)
    src, dst = tmp_path / 'albef.pth', tmp_path / 'codis.pth'
    torch.save({'model': albef.state_dict()}, src)
    result = convert_albef.main([str(src), str(dst), '--config', tiny_config])

    # What stays fresh is exactly what ALBEF does not have.
    fresh_parts = {k.split('.')[0] for k in result['fresh']}
    expected_fresh = {'image_queue', 'text_queue', 'num_steps', 'num_anonymous_ids', 'image_teacher',
                      'text_teacher'}
    assert fresh_parts <= expected_fresh | ({'mlm_head'} if name == 'codis_retrieval' else set())
    assert all(k.endswith('num_updates') for k in result['fresh'] if 'teacher' in k)

    from vlp_codebook.engine.config import load_config
    codis = MODELS.build(load_config(tiny_config).model).eval()
    missing, unexpected = codis.load_state_dict(read_checkpoint(dst)['state_dict'], strict=False)
    assert not unexpected and set(missing) == set(result['fresh'])

    bert = albef.text_encoder.bert if name == 'codis_pretrain' else albef.text_encoder
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(1000, 3000, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        image_tokens = albef.visual_encoder.forward_features(images)
        text_hidden = bert(ids, attention_mask=mask, return_dict=True, mode='text').last_hidden_state
        fused = bert(encoder_embeds=text_hidden, attention_mask=mask, encoder_hidden_states=image_tokens,
                     encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
                     return_dict=True, mode='fusion').last_hidden_state
        feats = codis.extract_feats(images, ids, mask)
        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats['image_embeds'], F.normalize(albef.vision_proj(image_tokens[:, 0]), dim=-1), **close)
        torch.testing.assert_close(feats['text_embeds'], F.normalize(albef.text_proj(text_hidden[:, 0]), dim=-1), **close)
        torch.testing.assert_close(codis.itm_scores(images, ids, mask), albef.itm_head(fused[:, 0])[:, 1], **close)
        if name == 'codis_pretrain':
            ours = codis.mlm_head(codis.fusion_encoder(feats['text_hidden'], mask, feats['image_tokens']))
            torch.testing.assert_close(ours, albef.text_encoder.cls(fused), **close)
        # Teachers from the momentum copies.
        image_m = albef.visual_encoder_m.forward_features(images)
        torch.testing.assert_close(codis.image_teacher(images)[1],
                                   F.normalize(albef.vision_proj_m(image_m[:, 0]), dim=-1), **close)
        bert_m = albef.text_encoder_m.bert if name == 'codis_pretrain' else albef.text_encoder_m
        text_m = bert_m(ids, attention_mask=mask, return_dict=True, mode='text').last_hidden_state
        torch.testing.assert_close(codis.text_teacher(ids, mask)[1],
                                   F.normalize(albef.text_proj_m(text_m[:, 0]), dim=-1), **close)
    assert codis.distillation_loss.temperature.item() == pytest.approx(albef.temp.item())
    assert torch.equal(codis.codebook_loss.codebook.weight, albef.codebook_loss.codebook.weight)


def test_conversion_refuses_what_is_not_albef(tmp_path):
    from vlp_codebook.models.albef_weights import albef_to_codis_state_dict
    with pytest.raises(ValueError, match='no visual_encoder'):
        albef_to_codis_state_dict({'bert.embeddings.word_embeddings.weight': torch.zeros(4, 2)})
    vit = {'visual_encoder.blocks.0.attn.qkv.weight': torch.zeros(6, 2)}
    blip_like = dict(vit, **{'text_encoder.embeddings.word_embeddings.weight': torch.zeros(4, 2),
                             'text_encoder.encoder.layer.0.crossattention.self.query.weight': torch.zeros(2, 2)})
    with pytest.raises(ValueError, match='BLIP layout'):
        albef_to_codis_state_dict(blip_like)
    text_only = dict(vit, **{'text_encoder.embeddings.word_embeddings.weight': torch.zeros(4, 2),
                             'text_encoder.encoder.layer.0.attention.self.query.weight': torch.zeros(2, 2)})
    with pytest.raises(ValueError, match='no cross-attention'):
        albef_to_codis_state_dict(text_only)
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        convert_albef.main([str(tmp_path / 'nope.pth'), str(tmp_path / 'out.pth')])


def test_encoders_load_an_albef_file_directly(lavis_plugin, tmp_path):
    # The encoders' own `pretrained=` on the ALBEF file: sizes read off the tensors (only the
    # head counts given), LAVIS's BERT without token-type embeddings, fusion from layer 1 on.
    from vlp_codebook.models.encoders import BertFusionEncoder, BertTextEncoder, ViTImageEncoder
    albef = _albef(lavis_plugin, 'codis_retrieval')
    path = tmp_path / 'albef.pth'
    torch.save({'model': albef.state_dict()}, path)
    vit = ViTImageEncoder(image_size=32, num_heads=2, pretrained=str(path)).eval()
    text = BertTextEncoder(num_layers=1, num_heads=2, pretrained=str(path)).eval()
    fusion = BertFusionEncoder(num_layers=1, num_heads=2, pretrained=str(path), load_cross_attention=True).eval()
    assert (text.width, text.vocab_size, text.config.intermediate_size) == (32, 30522, 64)
    g = torch.Generator().manual_seed(2)
    images, ids = torch.randn(2, 3, 32, 32, generator=g), torch.randint(1000, 3000, (2, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        image_tokens = albef.visual_encoder.forward_features(images)
        text_hidden = albef.text_encoder(ids, attention_mask=mask, return_dict=True, mode='text').last_hidden_state
        fused = albef.text_encoder(encoder_embeds=text_hidden, attention_mask=mask, encoder_hidden_states=image_tokens,
                                   encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
                                   return_dict=True, mode='fusion').last_hidden_state
        torch.testing.assert_close(vit(images), image_tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text(ids, mask), text_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fusion(text_hidden, mask, image_tokens), fused, rtol=1e-5, atol=1e-5)


def test_converted_checkpoint_loads_through_load_from(lavis_plugin, tmp_path):
    # The documented route: convert, then train with load_from (lr 0, so the students keep the
    # loaded weights; the run itself proves that the fresh parts are merely missing keys).
    from vlp_codebook.tools import train as train_tool
    albef = _albef(lavis_plugin, 'codis_pretrain')
    src, dst = tmp_path / 'albef.pth', tmp_path / 'codis.pth'
    torch.save({'model': albef.state_dict()}, src)
    config = tmp_path / 'tiny_codis_demo.py'
    config.write_text(TINY_CODIS.format(base=osp.join(ROOT, 'configs', 'codis_demo.py'), vocab=minilm_l6_dir()))
    convert_albef.main([str(src), str(dst), '--config', str(config)])
    runner = train_tool.main([str(config), '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                              f'load_from={dst}', 'optim_wrapper.optimizer.lr=0.0',
                              'optim_wrapper.optimizer.weight_decay=0.0', 'train_cfg.max_epochs=1',
                              'train_dataloader.dataset.num_images=4', 'train_dataloader.batch_size=4',
                              'val_dataloader.dataset.num_images=4', 'train_cfg.val_interval=1',
                              'param_scheduler=[]', 'default_hooks.checkpoint.interval=1'])
    assert runner.train_loop.iter >= 1
    model = runner.model
    torch.testing.assert_close(model.itm_head.classifier.weight, albef.itm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.image_tower.proj.linear.weight, albef.vision_proj.weight, rtol=0, atol=0)
    assert torch.equal(model.fusion_encoder.layer[0].crossattention.self.key.weight,
                       albef.text_encoder.bert.encoder.layer[1].crossattention.self.key.weight)
