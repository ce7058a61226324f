"""vlp_codebook_lavis in LAVIS's registry: names, re-import safety, load_model by name, configs."""
from __future__ import annotations

import importlib
import os

import pytest


def test_import_registers_models_and_tasks(lavis_plugin):
    from lavis.common.registry import registry
    for name, cls in lavis_plugin.MODEL_NAMES.items():
        assert registry.get_model_class(name) is cls
    assert registry.get_task_class('codis_retrieval') is lavis_plugin.CodisRetrievalTask
    assert registry.get_task_class('codis_image_text_pretrain') is lavis_plugin.CodisImageTextPretrainTask
    assert set(lavis_plugin.MODEL_NAMES) == {'codis_retrieval', 'codis_pretrain', 'codis_blip_retrieval'}
    # LAVIS's own entries are untouched
    from lavis.models.albef_models.albef_retrieval import AlbefRetrieval
    assert registry.get_model_class('albef_retrieval') is AlbefRetrieval


def test_reimport_is_safe_and_rebinds(lavis_plugin):
    from lavis.common.registry import registry
    import vlp_codebook_lavis.models.codis_retrieval as module
    old = registry.get_model_class('codis_retrieval')
    reloaded = importlib.reload(module)
    lavis_plugin.register_all()       # what a re-import of the package does
    lavis_plugin.register_all()
    # the reloaded module's class is a new object with the same qualified name
    assert reloaded.CodisRetrieval is not old
    from vlp_codebook_lavis.registration import register_once
    register_once('model', 'codis_retrieval', reloaded.CodisRetrieval)
    assert registry.get_model_class('codis_retrieval') is reloaded.CodisRetrieval
    register_once('model', 'codis_retrieval', old)   # restore for the other tests
    assert registry.get_model_class('codis_retrieval') is old


def test_foreign_name_collision_is_an_error(lavis_plugin):
    from lavis.models.albef_models.albef_retrieval import AlbefRetrieval
    from vlp_codebook_lavis.registration import register_once
    with pytest.raises(KeyError, match='albef_retrieval.*already registered.*AlbefRetrieval'):
        register_once('model', 'albef_retrieval', lavis_plugin.CodisRetrieval)
    with pytest.raises(ValueError, match='kind must be one of'):
        register_once('runner', 'x', AlbefRetrieval)


def test_default_configs_are_absolute_and_exist(lavis_plugin):
    for cls in lavis_plugin.MODEL_NAMES.values():
        for model_type, path in cls.PRETRAINED_MODEL_CONFIG_DICT.items():
            resolved = cls.default_config_path(model_type)   # LAVIS's own resolution
            assert os.path.isabs(resolved) and os.path.isfile(resolved), (cls, model_type, resolved)
    from lavis.models import ModelZoo
    zoo = dict(iter(ModelZoo()))
    assert zoo['codis_retrieval'] == ['coco', 'flickr', 'tiny']
    assert zoo['codis_pretrain'] == ['base', 'tiny']


@pytest.mark.parametrize('name,expected', [
    ('codis_retrieval', 'AlbefRetrieval'),
    ('codis_pretrain', 'AlbefPretrain'),
    ('codis_blip_retrieval', 'BlipRetrieval'),
])
def test_load_model_by_name_offline(lavis_plugin, name, expected):
    from lavis.models import load_model
    model = load_model(name, 'tiny')
    assert type(model).__name__ != expected and expected in [c.__name__ for c in type(model).__mro__]
    assert model.codebook_loss.codebook.weight.shape == (16, 16)   # tiny: K=16, embed_dim=16
    assert model.visual_encoder.vision_width == 32 and len(model.visual_encoder.blocks) == 1
    # the offline tokenizer is bert-base-uncased's vocabulary
    assert model.tokenizer.convert_tokens_to_ids(['[CLS]', '[SEP]', '[MASK]', 'the']) == [101, 102, 103, 1996]


def test_load_model_and_preprocess_finds_shipped_processors(lavis_plugin):
    from lavis.models import load_model_and_preprocess
    model, vis, txt = load_model_and_preprocess('codis_retrieval', 'tiny', is_eval=True)
    from PIL import Image
    image = vis['eval'](Image.new('RGB', (50, 70), (10, 200, 30)))
    assert image.shape == (3, 32, 32)                  # blip_image_eval at the tiny image_size
    assert txt['eval']('A Dog running!') == 'a dog running'   # blip_caption: lower case, no '!'
    assert not model.training


def test_unknown_config_values_fail_clearly(lavis_plugin):
    from omegaconf import OmegaConf
    from lavis.models import load_model  # noqa: F401
    base = OmegaConf.load(lavis_plugin.CodisRetrieval.default_config_path('tiny')).model
    bad_plan = OmegaConf.merge(base, {'codebook_loss': {'plan_features': 'momentum'}})
    with pytest.raises(ValueError, match='plan_features must be one of'):
        lavis_plugin.CodisRetrieval.from_config(bad_plan)
    bad_vit = OmegaConf.merge(base, {'vit_type': 'huge'})
    with pytest.raises(ValueError, match="vit_type must be 'base', 'large' or 'custom'"):
        lavis_plugin.CodisRetrieval.from_config(bad_vit)
    missing = OmegaConf.merge(base, {'med_config_path': 'configs/models/no_such_config.json'})
    with pytest.raises(FileNotFoundError, match='no_such_config.json.*looked at'):
        lavis_plugin.CodisRetrieval.from_config(missing)
    no_ckpt = OmegaConf.merge(base, {'load_pretrained': True, 'pretrained': ''})
    with pytest.raises(ValueError, match='model.pretrained is empty'):
        lavis_plugin.CodisRetrieval.from_config(no_ckpt)


def test_tokenizer_path_is_configurable(lavis_plugin, tmp_path):
    from omegaconf import OmegaConf
    from vlp_codebook_lavis.paths import default_tokenizer_path
    vocab = open(os.path.join(default_tokenizer_path(), 'vocab.txt')).read().splitlines()
    # a 1000-word vocabulary of our own: the model must use it, not a downloaded one
    (tmp_path / 'vocab.txt').write_text('\n'.join(vocab[:1000]) + '\n')
    cfg = OmegaConf.merge(OmegaConf.load(lavis_plugin.CodisRetrieval.default_config_path('tiny')).model,
                          {'tokenizer': str(tmp_path)})
    model = lavis_plugin.CodisRetrieval.from_config(cfg)
    assert len(model.tokenizer) == 1000
    with pytest.raises(FileNotFoundError, match='tokenizer'):
        lavis_plugin.CodisRetrieval.from_config(OmegaConf.merge(cfg, {'tokenizer': str(tmp_path / 'nope')}))
