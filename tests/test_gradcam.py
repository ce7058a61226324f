"""Grad-CAM of the ITM logit on cross-attention: checked against finite differences of the logit
with respect to the attention probabilities, and for side effects."""
import numpy as np
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
    with Image.open(out / result['files'][1]) as panel:
        assert panel.size == (224, 224)                      # 32 px upsampled 7x
    # the grid: the image, then every token's map, each panel titled with its token
    assert result['grid_labels'] == ['image', '[CLS]', *words, '[SEP]']
    assert result['layer'] == 0                                # the first of the demo's two fusion layers
    with Image.open(out / 'grid.png') as grid:
        assert grid.width >= 6 * 150 and grid.height >= 2 * 150
    # The maps are itm_gradcam's on the preprocessed inputs.
    model.eval()
    data = model.data_preprocessor({'images': item['image'][None], 'texts': [caption]}, False)
    expected, logit = itm_gradcam(model, data['images'], data['input_ids'], data['attention_mask'])
    torch.testing.assert_close(result['cams'], expected[0], rtol=1e-4, atol=1e-6)
    assert result['logit'] == pytest.approx(logit[0].item(), rel=1e-5)
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        gradcam_tool.main([str(config), str(tmp_path / 'nope.pth'), str(image), caption])


def test_default_layer_is_the_first_of_two_and_never_the_last():
    from vlp_codebook.analysis.gradcam import default_layer
    assert default_layer(2) == 0 and default_layer(6) == 2 and default_layer(1) == 0
    assert all(default_layer(n) < n - 1 for n in range(2, 13))


def test_overlay_keeps_the_images_colours_where_the_map_is_zero():
    from vlp_codebook.analysis.gradcam_figure import overlay
    image = torch.rand(3, 32, 32)
    cam = torch.zeros(4, 4)
    cam[0, 0] = 2.0                                          # one hot patch, top left
    picture = np.asarray(overlay(image, cam, scale=7)).astype(int)
    assert picture.shape == (224, 224, 3)
    upsampled = (image.double().repeat_interleave(7, 1).repeat_interleave(7, 2).permute(1, 2, 0).numpy() * 255).round()
    # bilinear upsampling spreads the patch over at most 1.5 patches: beyond, the image is untouched
    assert (picture[:, 112:] == upsampled[:, 112:]).all() and (picture[112:] == upsampled[112:]).all()
    # on the hot patch the colour map shows (red, at 60 % opacity)
    hot = picture[10:20, 10:20].reshape(-1, 3) - upsampled[10:20, 10:20].reshape(-1, 3)
    assert np.abs(hot).mean() > 30
    # a map that is zero everywhere draws nothing
    assert (np.asarray(overlay(image, torch.zeros(4, 4), scale=7)).astype(int) == upsampled).all()


def test_make_sample_writes_a_test_scene_and_its_full_caption(tmp_path):
    from PIL import Image

    from vlp_codebook.datasets.synthetic_shapes import SyntheticShapesDataset
    from vlp_codebook.tools import make_sample
    result = make_sample.main(['--out', str(tmp_path), '--index', '3'])
    test = SyntheticShapesDataset(num_images=4, split='test', image_size=32)
    with Image.open(tmp_path / 'sample.png') as image:
        pixels = torch.from_numpy(np.asarray(image.convert('RGB')).copy()).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(pixels, test.image(3))
    caption = (tmp_path / 'caption.txt').read_text().strip()
    scene = test.scenes[3]
    assert caption == result['caption']
    for obj in (scene.first, scene.second):                 # names both objects fully
        assert f'{obj.size} {obj.color} {obj.shape}' in caption
    with pytest.raises(ValueError, match='--index'):
        make_sample.main(['--out', str(tmp_path), '--index', '-1'])


# ---------------------------------------------------------------- word maps of a trained model
TRAIN_ITERS = 200


@pytest.fixture(scope='module')
def trained_demo_model():
    """The demo config (2 fusion layers, all objectives) trained 200 iterations of batch 32 on
    one thread: about 25-35 s of CPU."""
    import os.path as osp

    from test_codis_model import CONFIGS
    from vlp_codebook.datasets.collate import vlp_collate
    from vlp_codebook.datasets.synthetic_shapes import SyntheticShapesDataset
    from vlp_codebook.engine.config import load_config
    from vlp_codebook.registry import MODELS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(osp.join(CONFIGS, 'codis_demo.py'))
        cfg.model.update(queue_size=256, alpha_warmup_iters=40)
        torch.manual_seed(0)
        model = MODELS.build(cfg.model).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.02)
        data = SyntheticShapesDataset(num_images=2000, split='train', image_size=32)
        order = torch.randint(len(data), (TRAIN_ITERS, 32), generator=torch.Generator().manual_seed(0))
        for rows in order.tolist():
            losses = model(**model.data_preprocessor(vlp_collate([data[i] for i in rows]), True), mode='loss')
            optimizer.zero_grad()
            sum(value for name, value in losses.items() if 'loss' in name).backward()
            optimizer.step()
        model.eval()
        from vlp_codebook.analysis.pointing import pointing_game
        result = pointing_game(model, SyntheticShapesDataset(num_images=150, split='test', image_size=32))
    finally:
        torch.set_num_threads(threads)
    return model, result


def test_colour_word_maps_peak_inside_the_named_object_more_often_than_its_area(trained_demo_model):
    # "red" in "a small red circle left of a large blue square": the map's peak patch vs the red
    # object's mask. Chance (a peak patch drawn at random) is the mask's area fraction.
    # Measured (150 scenes, 300 colour words): 0.240 vs chance 0.100; an untrained model 0.196.
    _, result = trained_demo_model
    hit, chance = result['color']['hit'], result['color']['chance']
    assert len(hit) == 300                       # two colour words per caption
    assert hit.mean() > 1.5 * chance.mean(), (hit.mean(), chance.mean())
    assert hit.mean() - chance.mean() > 4 * hit.std() / np.sqrt(len(hit))   # not luck


@pytest.mark.xfail(strict=True, reason='measured after 200 iterations: colour words peak in the OTHER object as often '
                   'as in the named one (47 % vs 53 % of words), shape words in the named shape no more often than '
                   'its area (0.100 vs 0.103); the 1250-iteration demo: colour 50 % vs 37 %, shape 42 % vs 42 %; an '
                   'image-independent map peaking mid-image scores 0.21, as high as the maps (docs/analysis.md). '
                   'Flip this when it passes.')
def test_word_maps_point_at_the_named_object_not_just_at_objects(trained_demo_model):
    _, result = trained_demo_model
    for kind in ('color', 'shape'):
        hit, other = result[kind]['hit'], result[kind]['other']
        assert hit.mean() > 1.5 * result[kind]['chance'].mean(), kind
        assert np.mean(hit > other) > np.mean(other > hit) + 0.1, kind
        # and beats the best image-independent peak position (the objects sit near the centre lines)
        assert hit.mean() > result[kind]['patch_coverage'].mean(0).max() + 0.03, kind
