"""Grad-CAM of the ITM logit on cross-attention: checked against finite differences of the logit
with respect to the attention probabilities, and for side effects."""
import pytest
import torch

from test_codis_model import batch, tiny_model
from vlp_codebook.analysis import itm_gradcam


@pytest.fixture(scope='module')
def model_and_inputs():
    model = tiny_model(fusion_encoder=dict(num_layers=2)).train()
    inputs = model.data_preprocessor(batch(3, split='test'), False)
    # One caption per image: the first caption of each.
    texts = inputs['text_to_image']
    first = torch.stack([(texts == i).nonzero()[0, 0] for i in range(3)])
    return model, inputs['images'], inputs['input_ids'][first], inputs['attention_mask'][first]


def _logit_with(model, images, ids, mask, layer, edit):
    """ITM positive logits with ``edit(probs)`` applied to layer ``layer``'s cross-attention."""
    block = model.fusion_encoder.layer[layer].crossattention
    block.probs_hook = edit
    try:
        with torch.no_grad():
            image_tokens, _ = model.image_tower(images)
            hidden, _ = model.text_tower(ids, mask)
            return model.itm_head(model.fusion_encoder(hidden, mask, image_tokens))[:, 1].double()
    finally:
        block.probs_hook = None


@pytest.mark.parametrize('layer', [0, 1])
def test_gradcam_is_attention_times_positive_finite_difference_gradient(model_and_inputs, layer):
    model, images, ids, mask = model_and_inputs
    cams, logit = itm_gradcam(model, images, ids, mask, layer=layer)
    assert cams.shape == (3, ids.shape[1], 4, 4) and (cams >= 0).all()
    model.eval()
    seen = []
    base = _logit_with(model, images, ids, mask, layer, lambda p: seen.append(p) or p)
    torch.testing.assert_close(logit.double(), base, rtol=1e-5, atol=1e-5)
    probs = seen[0].double()
    heads = probs.shape[1]
    delta = 1e-2
    for n, l, j in [(0, 0, 1), (1, 2, 5), (2, 1, 16), (0, 3, 9)]:
        expected = 0.0
        for h in range(heads):
            def bump(sign, h=h):
                def edit(p):
                    p = p.clone()
                    p[n, h, l, j] += sign * delta
                    return p
                return edit
            grad = (_logit_with(model, images, ids, mask, layer, bump(1))[n]
                    - _logit_with(model, images, ids, mask, layer, bump(-1))[n]) / (2 * delta)
            expected += probs[n, h, l, j].item() * max(grad.item(), 0.0) / heads
        row, col = divmod(j - 1, 4)      # image token j >= 1 is patch j - 1 of the 4 x 4 grid
        assert cams[n, l, row, col].item() == pytest.approx(expected, rel=2e-2, abs=1e-6), (n, l, j)


def test_word_maps_vanish_in_the_last_fusion_layer_only(model_and_inputs):
    # The ITM head reads the last layer's [CLS] output: there, no word's attention reaches it.
    model, images, ids, mask = model_and_inputs
    last, _ = itm_gradcam(model, images, ids, mask, layer=1)
    first, _ = itm_gradcam(model, images, ids, mask)           # default: layer 0 of 2
    assert (last[:, 1:] == 0).all() and (last[:, 0] > 0).any()
    assert (first[:, 1:][mask[:, 1:] == 1] > 0).any()


def test_gradcam_leaves_the_model_as_it_was(model_and_inputs):
    model, images, ids, mask = model_and_inputs
    model.train()
    for param in model.parameters():
        param.grad = None
    cams, _ = itm_gradcam(model, images, ids, mask)
    assert model.training
    assert all(param.grad is None for param in model.parameters())
    assert all(layer.crossattention.probs_hook is None for layer in model.fusion_encoder.layer)
    # Padding tokens have no map; frozen parameters do not matter (the probabilities are the leaf).
    assert (cams[mask == 0] == 0).all() and (mask == 0).any()
    model.requires_grad_(False)
    try:
        frozen, _ = itm_gradcam(model, images, ids, mask)
    finally:
        model.requires_grad_(True)
    torch.testing.assert_close(frozen, cams)


def test_gradcam_errors(model_and_inputs):
    model, images, ids, mask = model_and_inputs
    with pytest.raises(ValueError, match='layer=5 but the fusion encoder has 2 layers'):
        itm_gradcam(model, images, ids, mask, layer=5)
    no_itm = tiny_model(itm_loss=None, mlm_loss=None)
    with pytest.raises(RuntimeError, match='needs a model with fusion_encoder'):
        itm_gradcam(no_itm, images, ids, mask)


def test_gradcam_tool_writes_one_overlay_per_token(tmp_path):
    import os.path as osp

    import numpy as np
    from PIL import Image

    from test_codis_model import CONFIGS
    from vlp_codebook.datasets.synthetic_shapes import SyntheticShapesDataset
    from vlp_codebook.tools import gradcam as gradcam_tool

    config = tmp_path / 'tiny.py'
    config.write_text(f"""_base_ = [{osp.join(CONFIGS, 'codis_demo.py')!r}]
model = dict(image_encoder=dict(num_layers=1, hidden_size=32, num_heads=2), embed_dim=16,
             text_encoder=dict(hidden_size=32, num_heads=2), queue_size=16,
             fusion_encoder=dict(hidden_size=32, num_heads=2, encoder_width=32))
""")
    from vlp_codebook.engine.config import load_config
    from vlp_codebook.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(load_config(str(config)).model)
    ckpt = tmp_path / 'model.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    item = SyntheticShapesDataset(num_images=1, split='test', image_size=32)[0]
    image = tmp_path / 'scene.png'
    Image.fromarray((item['image'].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(image)
    caption = item['texts'][0]
    out = tmp_path / 'maps'
    result = gradcam_tool.main([str(config), str(ckpt), str(image), caption, '--out', str(out)])

    words = caption.split()
    assert result['files'][0] == '00_[CLS].png' and len(result['files']) == len(words) + 2   # [CLS] ... [SEP]
    assert [f.split('_', 1)[1][:-4] for f in result['files'][1:-1]] == words
    assert all((out / f).is_file() for f in result['files'])
    with Image.open(out / 'grid.png') as grid:
        assert grid.size == (32 * len(result['files']), 32)
    # The maps are itm_gradcam's on the preprocessed inputs.
    model.eval()
    data = model.data_preprocessor({'images': item['image'][None], 'texts': [caption]}, False)
    expected, logit = itm_gradcam(model, data['images'], data['input_ids'], data['attention_mask'])
    torch.testing.assert_close(result['cams'], expected[0], rtol=1e-4, atol=1e-6)
    assert result['logit'] == pytest.approx(logit[0].item(), rel=1e-5)
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        gradcam_tool.main([str(config), str(tmp_path / 'nope.pth'), str(image), caption])
