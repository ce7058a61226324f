"""Bad input -> the expected error (or the correct handling), one table per area.

Scan the ``CASES`` tables: each row is ``(what is given, exception, words the message must hold)``.

1. A malicious checkpoint (its unpickling creates a marker file) through every load path:
   refused and the marker absent by default; with the explicit opt-in the code runs (which
   proves the "refused" rows would notice it running).
2. Checkpoints that load but do not fit the model: test / gradcam / load_from / resume refuse.
3. Corrupt checkpoint files: the error names the file and what to do.
4. Configs: a misspelled top-level key, an unknown optimizer.
5. Data: lone surrogates in captions (hypothesis), non-UTF-8 annotation files, 16-bit and float
   images (scaled, or refused).
"""
from __future__ import annotations

import contextlib
import json
import os
import os.path as osp
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

FIXTURES = Path(__file__).resolve().parent / 'fixtures'
TOY_CONFIG = str(FIXTURES / 'toy_config.py')
REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(REPO, 'configs')
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

from mmengine.runner import CheckpointLoader  # noqa: E402

import vlp_codebook.engine  # noqa: E402,F401
from vlp_codebook.datasets import CaptionPretrainDataset, CaptionRetrievalDataset, clean_caption, load_image  # noqa: E402
from vlp_codebook.checkpoint_io import (TRUST_ENV, CorruptCheckpointError, UntrustedCheckpointError,  # noqa: E402
                                        read_checkpoint)
from vlp_codebook.engine.checkpoint import checkpoint_loading  # noqa: E402
from vlp_codebook.engine.config import list_shipped_configs, load_config  # noqa: E402
from vlp_codebook.tools import test as test_tool  # noqa: E402
from vlp_codebook.tools import train as train_tool  # noqa: E402


# ============================================================== 1. malicious checkpoints

class _CreatesFile:
    """Unpickling this calls ``open(marker, 'w')``: a stand-in for any code an attacker wants run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


@pytest.fixture
def evil(tmp_path):
    """(path of a checkpoint that creates ``marker`` when unpickled, marker path)."""
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': _CreatesFile(str(marker)), 'model': {}}, path)
    assert not marker.exists()
    return str(path), marker


GRADCAM_CONFIG = """_base_ = [{base!r}]
model = dict(image_encoder=dict(num_layers=1, hidden_size=32, num_heads=2), embed_dim=16,
             text_encoder=dict(hidden_size=32, num_heads=2), queue_size=16,
             fusion_encoder=dict(hidden_size=32, num_heads=2, encoder_width=32))
"""


def _gradcam_inputs(tmp_path):
    config = tmp_path / 'tiny.py'
    config.write_text(GRADCAM_CONFIG.format(base=osp.join(CONFIGS, 'codis_demo.py')))
    image = tmp_path / 'scene.png'
    Image.new('RGB', (32, 32), (200, 30, 30)).save(image)
    return str(config), str(image)


def _via_test_tool(path, tmp_path, trust):
    test_tool.main([TOY_CONFIG, path, '--work-dir', str(tmp_path / 'w')] + (['--trust-checkpoint'] if trust else []))


def _via_train_resume(path, tmp_path, trust):
    train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'w'), '--resume', path]
                    + (['--trust-checkpoint'] if trust else []))


def _via_train_load_from(path, tmp_path, trust):
    train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'w'), '--cfg-options', f'load_from={path}']
                    + (['--trust-checkpoint'] if trust else []))


def _via_gradcam(path, tmp_path, trust):
    from vlp_codebook.tools import gradcam
    config, image = _gradcam_inputs(tmp_path)
    gradcam.main([config, path, image, 'a red square', '--out', str(tmp_path / 'maps')]
                 + (['--trust-checkpoint'] if trust else []))


def _via_convert_albef(path, tmp_path, trust):
    from vlp_codebook.tools import convert_albef
    convert_albef.main([path, str(tmp_path / 'out.pth')] + (['--trust-checkpoint'] if trust else []))


def _via_mmengine_loader(path, tmp_path, trust):
    # mmengine's own CheckpointLoader after `import vlp_codebook.engine` (done above): the import
    # changes nothing; the opt-in is a trusting checkpoint_loading block
    with checkpoint_loading(trust=True) if trust else contextlib.nullcontext():
        CheckpointLoader.load_checkpoint(path, map_location='cpu')


def _via_encoder_pretrained(path, tmp_path, trust):
    from vlp_codebook.models.encoders import ViTImageEncoder
    with pytest.MonkeyPatch.context() as patch:
        if trust:
            patch.setenv(TRUST_ENV, '1')
        ViTImageEncoder(image_size=32, num_heads=2, pretrained=path)


def _via_lavis_vit_pretrained(path, tmp_path, trust):
    from omegaconf import OmegaConf
    from vlp_codebook_lavis.encoders import build_vision_encoder
    with pytest.MonkeyPatch.context() as patch:
        if trust:
            patch.setenv(TRUST_ENV, '1')
        build_vision_encoder(OmegaConf.create(dict(vit_type='custom', image_size=32, vit_patch_size=16,
                                                   vit_width=32, vit_depth=1, vit_num_heads=2, vit_pretrained=path)))


def _via_lavis_switch(switch):
    """A codis_* LAVIS model's ``load_finetuned`` / ``load_pretrained`` switch (LAVIS's loader)."""
    def via_switch(path, tmp_path, trust):
        from omegaconf import OmegaConf
        from vlp_codebook_lavis import MODEL_NAMES
        cls = MODEL_NAMES['codis_retrieval']
        cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path('tiny')).model,
                              {f'load_{switch}': True, switch: path})
        with pytest.MonkeyPatch.context() as patch:
            if trust:
                patch.setenv(TRUST_ENV, '1')
            cls.from_config(cfg)
    return via_switch


def _hub_cache(tmp_path, monkeypatch):
    """A private torch hub cache ($TORCH_HOME/hub/checkpoints): a 'download' finds its files there."""
    home = tmp_path / 'torch_home'
    cache = home / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    monkeypatch.setenv('TORCH_HOME', str(home))
    return cache


def _plant_in_cache(url, source, tmp_path, monkeypatch):
    from urllib.parse import urlparse
    target = _hub_cache(tmp_path, monkeypatch) / osp.basename(urlparse(url).path)
    target.write_bytes(Path(source).read_bytes())
    return url


def _url_route(route):
    """``route`` given the checkpoint as an https:// URL whose file is in the torch hub cache."""
    def via_url(path, tmp_path, trust):
        with pytest.MonkeyPatch.context() as patch:
            url = _plant_in_cache('https://models.example.invalid/weights/evil.pth', path, tmp_path, patch)
            route(url, tmp_path, trust)
    return via_url


LOAD_PATHS = {
    'tools.test CONFIG evil.pth': _via_test_tool,
    'tools.train --resume evil.pth': _via_train_resume,
    'tools.train --cfg-options load_from=evil.pth': _via_train_load_from,
    'tools.gradcam CONFIG evil.pth IMAGE CAPTION': _via_gradcam,
    'tools.convert_albef evil.pth OUT': _via_convert_albef,
    'mmengine CheckpointLoader after import vlp_codebook.engine': _via_mmengine_loader,
    'ViTImageEncoder(pretrained=evil.pth)': _via_encoder_pretrained,
    'LAVIS plugin vit_pretrained=evil.pth': _via_lavis_vit_pretrained,
    'LAVIS codis_retrieval finetuned: evil.pth': _via_lavis_switch('finetuned'),
    'LAVIS codis_retrieval pretrained: evil.pth': _via_lavis_switch('pretrained'),
    # a URL: mmengine's http(s) loader (torch.hub, weights_only=False by default) finds it in the hub cache
    'tools.test CONFIG https://.../evil.pth (torch hub cache)': _url_route(_via_test_tool),
    'tools.train --cfg-options load_from=https://.../evil.pth': _url_route(_via_train_load_from),
    'tools.train --resume https://.../evil.pth': _url_route(_via_train_resume),
}


@pytest.mark.parametrize('route', list(LOAD_PATHS))
def test_malicious_checkpoint_is_refused_by_default(route, evil, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    path, marker = evil
    with pytest.raises(pickle_error()) as error:
        LOAD_PATHS[route](path, tmp_path, trust=False)
    assert not marker.exists(), f'{route}: code from the checkpoint ran'
    if isinstance(error.value, UntrustedCheckpointError):   # ours: file, type and opt-in named
        message = str(error.value)
        assert 'evil.pth' in message and 'io.open' in message
        assert '--trust-checkpoint' in message and f'{TRUST_ENV}=1' in message
    else:   # mmengine's own loader, untouched: torch's refusal
        assert route.startswith('mmengine') and 'Weights only load failed' in str(error.value)


@pytest.mark.parametrize('route', list(LOAD_PATHS))
def test_malicious_checkpoint_runs_only_after_the_opt_in(route, evil, tmp_path):
    path, marker = evil
    # what happens after unpickling (a wrong model, no 'meta'...) does not matter here
    with contextlib.suppress(Exception):
        LOAD_PATHS[route](path, tmp_path, trust=True)
    assert marker.exists(), f'{route}: the opt-in did not unpickle (so the refusal test proves nothing)'


def pickle_error():
    import pickle
    return pickle.UnpicklingError


# ============================================================== 1b. checkpoints given as a URL or scheme

def _http_url(prefix):
    def url(source, tmp_path, monkeypatch):
        return _plant_in_cache(f'{prefix}models.example.invalid/weights/evil.pth', source, tmp_path, monkeypatch)
    return url


def _model_zoo_url(prefix, table, name):
    def url(source, tmp_path, monkeypatch):
        from mmengine.runner import checkpoint as mm_checkpoint
        _plant_in_cache(getattr(mm_checkpoint, table)()[name], source, tmp_path, monkeypatch)
        return f'{prefix}{name}'
    return url


def _object_store_url(prefix):
    """s3:// and petrel:// read through mmengine's file backend (petrel_client, not installed): a
    stand-in backend serves the planted file's bytes."""
    def url(source, tmp_path, monkeypatch):
        from mmengine.runner import checkpoint as mm_checkpoint

        class Store:
            def get(self, filename):
                return Path(source).read_bytes()
        monkeypatch.setattr(mm_checkpoint, 'get_file_backend', lambda *args, **kwargs: Store())
        return f'{prefix}bucket/evil.pth'
    return url


def _pavi_url(source, tmp_path, monkeypatch):
    """pavi:// downloads through the pavi package (not installed): a stand-in module copies the file."""
    import shutil
    import types

    class Model:
        name = 'evil.pth'

        def download(self, destination):
            shutil.copy(source, destination)

    pavi = types.ModuleType('pavi')
    pavi.modelcloud = types.SimpleNamespace(get=lambda path: Model())
    monkeypatch.setitem(sys.modules, 'pavi', pavi)
    return 'pavi://project/evil.pth'


#: every scheme mmengine's CheckpointLoader registers -> how to plant a file behind it offline
SCHEMES = {
    'http://': _http_url('http://'),
    'https://': _http_url('https://'),
    'torchvision://': _model_zoo_url('torchvision://', 'get_torchvision_models', 'resnet18'),
    'modelzoo://': _model_zoo_url('modelzoo://', 'get_torchvision_models', 'resnet18'),
    'mmcls://': _model_zoo_url('mmcls://', 'get_mmcls_models', 'vgg11'),
    'open-mmlab://': _model_zoo_url('open-mmlab://', 'get_external_models', 'vgg16_caffe'),
    'openmmlab://': _model_zoo_url('openmmlab://', 'get_external_models', 'vgg16_caffe'),
    r'(\S+\:)?s3://': _object_store_url('s3://'),
    r'(\S+\:)?petrel://': _object_store_url('petrel://'),
    'pavi://': _pavi_url,
}


def test_every_registered_scheme_is_covered_below():
    registered = {prefix for prefix in CheckpointLoader._schemes if prefix}
    assert registered == set(SCHEMES), f'new or removed mmengine schemes: {registered ^ set(SCHEMES)}'


@pytest.mark.parametrize('scheme', list(SCHEMES))
def test_scheme_loads_as_data(scheme, evil, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    path, marker = evil
    url = SCHEMES[scheme](path, tmp_path, monkeypatch)
    with checkpoint_loading(), pytest.raises(UntrustedCheckpointError) as error:
        CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert not marker.exists(), f'{url}: code from the checkpoint ran'
    message = str(error.value)
    assert url in message and 'io.open' in message and '--trust-checkpoint' in message
    # the same file with the opt-in: its code runs (so the refusal above is what stopped it)
    with checkpoint_loading(trust=True), contextlib.suppress(Exception):
        CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert marker.exists()
    # a plain state dict behind the same URL loads
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': {'backbone.w': torch.arange(3.0)}, 'meta': {'epoch': 1}}, good)
    url = SCHEMES[scheme](str(good), tmp_path / 'again', monkeypatch)
    with checkpoint_loading():
        loaded = CheckpointLoader.load_checkpoint(url, map_location='cpu')
    weights = loaded.get('state_dict', loaded)
    assert torch.equal(next(iter(weights.values())), torch.arange(3.0))


def test_last_checkpoint_naming_a_url_is_not_loaded(evil, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    path, marker = evil
    url = _plant_in_cache('https://models.example.invalid/weights/evil.pth', path, tmp_path, monkeypatch)
    work_dir = tmp_path / 'w'
    work_dir.mkdir()
    (work_dir / 'last_checkpoint').write_text(url)
    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(work_dir), '--resume', '--cfg-options',
                              'train_cfg.max_iters=1'])
    assert not marker.exists()
    assert runner.iter == 1   # from scratch: the work dir holds no checkpoint of its own
    log = next(work_dir.glob('*/*.log')).read_text()
    assert (f"last_checkpoint names '{url}', not a file of this work dir (to resume from it, pass it: "
            f"--resume URL), and there is no checkpoint in {work_dir}: training starts from scratch") in log


# ============================================================== 1c. contents beyond the schema

# (bombs, forged message hubs and numpy state: tests/test_checkpoint_schema.py)


# ============================================================== 2. checkpoints that do not fit

@pytest.fixture(scope='module')
def toy_checkpoint(tmp_path_factory):
    """A real 4-iteration toy run's checkpoint (optimizer, message hub, schedulers: all of it)."""
    work_dir = tmp_path_factory.mktemp('toy_run')
    train_tool.main([TOY_CONFIG, '--work-dir', str(work_dir), '--cfg-options', 'train_cfg.max_iters=4'])
    return work_dir / 'iter_4.pth'


def _toy_state(toy_checkpoint):
    return read_checkpoint(toy_checkpoint)['state_dict']


def test_checkpoints_the_project_writes_still_work(toy_checkpoint, tmp_path):
    metrics = test_tool.main([TOY_CONFIG, str(toy_checkpoint), '--work-dir', str(tmp_path / 'test')])
    assert np.isfinite(metrics['mse'])
    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'resume'), '--resume', str(toy_checkpoint)])
    assert runner.iter == 8
    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'finetune'),
                              '--cfg-options', f'load_from={toy_checkpoint}', 'train_cfg.max_iters=1'])
    assert runner.iter == 1


def _saved(tmp_path, name, state):
    path = tmp_path / name
    torch.save({'state_dict': state}, path)
    return str(path)


def test_test_tool_refuses_a_checkpoint_of_another_model_and_lists_the_unloaded(tmp_path):
    other = _saved(tmp_path, 'other.pth', {'backbone.weight': torch.zeros(3)})
    with pytest.raises(RuntimeError) as error:
        test_tool.main([TOY_CONFIG, other, '--work-dir', str(tmp_path / 'w')])
    message = str(error.value)
    assert "8 of the model's 8 parameters" in message and 'student.0.weight' in message
    # 9 state keys: 8 parameters and the toy's step buffer
    assert 'loaded 0/9 keys' in message and '--allow-missing-weights' in message and 'other.pth' in message
    # explicit flag: a (warned) number
    metrics = test_tool.main([TOY_CONFIG, other, '--work-dir', str(tmp_path / 'w'), '--allow-missing-weights'])
    assert np.isfinite(metrics['mse'])


def test_test_tool_refuses_other_shapes_and_partial_checkpoints(toy_checkpoint, tmp_path):
    state = dict(_toy_state(toy_checkpoint))
    state['student.0.weight'] = torch.zeros(3, 3)
    del state['teacher.3.bias']
    bad = _saved(tmp_path, 'bad.pth', state)
    with pytest.raises(RuntimeError) as error:
        test_tool.main([TOY_CONFIG, bad, '--work-dir', str(tmp_path / 'w')])
    message = str(error.value)
    assert "2 of the model's 8 parameters" in message
    assert 'student.0.weight (checkpoint (3, 3) vs model (16, 4))' in message and 'teacher.3.bias' in message


def test_gradcam_refuses_a_checkpoint_that_leaves_parameters_random(tmp_path):
    from vlp_codebook.tools import gradcam
    config, image = _gradcam_inputs(tmp_path)
    empty = _saved(tmp_path, 'empty.pth', {})
    with pytest.raises(RuntimeError, match=r'empty\.pth: (\d+) of the model\'s \1 parameters .*--allow-missing-weights'):
        gradcam.main([config, empty, image, 'a red square', '--out', str(tmp_path / 'maps')])
    assert not (tmp_path / 'maps').exists()


def test_load_from_fails_beyond_the_expected_missing_keys(toy_checkpoint, tmp_path, capsys):
    # the students and the toy's step buffer: only the 4 teacher tensors are missing
    students = {k: v for k, v in _toy_state(toy_checkpoint).items() if not k.startswith('teacher.')}
    partial = _saved(tmp_path, 'students.pth', students)
    with pytest.raises(RuntimeError) as error:
        train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'a'), '--cfg-options', f'load_from={partial}'])
    assert '4 model key(s) beyond the expected fresh ones' in str(error.value)
    assert 'teacher.0.weight' in str(error.value) and 'load_from_expected_missing' in str(error.value)
    # declared as expected: accepted, with the summary in the log
    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'b'), '--cfg-options',
                              f'load_from={partial}', "load_from_expected_missing=['teacher.*']",
                              'train_cfg.max_iters=1'])
    assert runner.iter == 1
    log = next((tmp_path / 'b').glob('*/*.log')).read_text()
    assert 'loaded 5/9 keys; missing 4; shape mismatch 0; unexpected 0' in log


def test_resume_from_another_models_checkpoint_is_refused(tmp_path):
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': {'x': torch.zeros(1)}, 'meta': {'epoch': 0, 'iter': 4}}, other)
    with pytest.raises(RuntimeError, match="This is not a checkpoint of this model"):
        train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'w'), '--resume', str(other)])


def test_converted_albef_keys_are_the_expected_missing_ones():
    # EXPECTED_MISSING_FROM_ALBEF must match real CODIS keys (a renamed buffer would silently fail)
    from vlp_codebook.engine.checkpoint_coverage import EXPECTED_MISSING_FROM_ALBEF, _matches
    from test_codis_model import tiny_model
    keys = list(tiny_model().state_dict())
    for pattern in EXPECTED_MISSING_FROM_ALBEF:
        assert any(_matches(k, [pattern]) for k in keys), pattern


# ============================================================== 6. saving, resuming, NaN weights, tools

class _Killed(BaseException):
    """Stands in for the process dying in the middle of writing a file."""


def test_interrupted_rewrite_keeps_the_old_checkpoint_and_pointer(toy_checkpoint, tmp_path, monkeypatch):
    from vlp_codebook.engine import checkpoint_saving
    work = tmp_path / 'w'
    work.mkdir()
    shutil.copy(toy_checkpoint, work / 'iter_4.pth')
    shutil.copy(toy_checkpoint, work / 'iter_8.pth')   # a good file the resumed run will rewrite at iter 8
    (work / 'last_checkpoint').write_text(str(work / 'iter_8.pth'))
    good = (work / 'iter_8.pth').read_bytes()

    def dies_halfway(handle, data):
        handle.write(data[: len(data) // 2])
        raise _Killed()

    monkeypatch.setattr(checkpoint_saving, '_write_all', dies_halfway)
    with pytest.raises(_Killed):
        train_tool.main([TOY_CONFIG, '--work-dir', str(work), '--resume', str(work / 'iter_4.pth')])
    assert (work / 'iter_8.pth').read_bytes() == good   # mmengine truncated it here
    assert (work / 'last_checkpoint').read_text() == str(work / 'iter_8.pth')
    assert sorted(p.name for p in work.glob('*.pth*')) == ['iter_4.pth', 'iter_8.pth']   # no temp file left


def _work_dir_with(tmp_path, toy_checkpoint, files):
    work = tmp_path / 'w'
    work.mkdir()
    data = Path(toy_checkpoint).read_bytes()
    contents = {'good': data, 'truncated': data[: len(data) // 2], 'zeroed': b'\0' * len(data)}
    for name, content in files.items():
        if name == 'last_checkpoint':
            (work / name).write_text(content.replace('WORK', str(work)))
        else:
            (work / name).write_bytes(contents.get(content, content))
    return work


RESUME_CASES = [
    # (work dir files, the checkpoint --resume picks, words of the line it logs (None: it logs none))
    ({'iter_4.pth': 'good', 'last_checkpoint': 'WORK/iter_4.pth'}, 'iter_4.pth', None),
    ({'iter_4.pth': 'good', 'last_checkpoint': '/moved/away/iter_4.pth'}, 'iter_4.pth', None),
    ({'iter_4.pth': 'good', '.iter_8.pth.k2j3.tmp': 'truncated', 'last_checkpoint': 'WORK/iter_4.pth'},
     'iter_4.pth', None),
    ({'iter_4.pth': 'good', 'iter_1.pth': 'good'},
     'iter_4.pth', 'last_checkpoint is missing; resuming from the newest intact checkpoint WORK/iter_4.pth'),
    ({'iter_4.pth': 'good', 'last_checkpoint': ''},
     'iter_4.pth', 'last_checkpoint is empty; resuming from the newest intact checkpoint WORK/iter_4.pth'),
    ({'iter_4.pth': 'good', 'iter_8.pth': b'', 'last_checkpoint': 'WORK/iter_8.pth'},
     'iter_4.pth', 'names WORK/iter_8.pth, which is not intact (0 bytes); resuming from the newest intact'),
    ({'iter_4.pth': 'good', 'iter_8.pth': 'truncated', 'iter_12.pth': 'zeroed', 'last_checkpoint': 'WORK/iter_12.pth'},
     'iter_4.pth', '(skipped as not intact: iter_12.pth: '),
    ({'iter_4.pth': 'good', 'last_checkpoint': 'WORK/iter_9.pth'}, 'iter_4.pth', 'names WORK/iter_9.pth, which does not exist'),
    ({}, None, 'last_checkpoint is missing, and there is no checkpoint in WORK: training starts from scratch'),
    ({'pretrained.pth': 'good'}, None, 'training starts from scratch (not resumed from: pretrained.pth'),
]


@pytest.mark.parametrize('files, picked, words', RESUME_CASES)
def test_resume_picks_an_intact_checkpoint_and_says_why(files, picked, words, tmp_path, toy_checkpoint):
    from vlp_codebook.engine.resume import pick_resume_checkpoint
    work = _work_dir_with(tmp_path, toy_checkpoint, files)
    path, message = pick_resume_checkpoint(str(work))
    assert path == (None if picked is None else str(work / picked))
    if words is None:
        assert message is None
    else:
        assert words.replace('WORK', str(work)) in message and '\n' not in message


def test_resume_refuses_when_every_checkpoint_is_damaged(tmp_path, toy_checkpoint):
    from vlp_codebook.engine.resume import pick_resume_checkpoint
    work = _work_dir_with(tmp_path, toy_checkpoint, {'iter_4.pth': 'truncated', 'iter_8.pth': b''})
    with pytest.raises(CorruptCheckpointError, match=r'none of the checkpoints .* is intact: iter_8\.pth: 0 bytes; '
                                                     r'iter_4\.pth: \d+ bytes, truncated'):
        pick_resume_checkpoint(str(work))


def test_resume_without_last_checkpoint_continues_from_the_newest(tmp_path, toy_checkpoint):
    # mmengine: "Auto resumed from the latest checkpoint None" and a fresh start
    work = _work_dir_with(tmp_path, toy_checkpoint, {'iter_4.pth': 'good', 'iter_8.pth': b''})
    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(work), '--resume'])
    assert runner.iter == 8 and len(runner.message_hub.get_scalar('train/loss').data[0]) == 8   # 4 restored
    log = next(work.glob('*/*.log')).read_text()
    assert (f'--resume: {work}/last_checkpoint is missing; resuming from the newest intact checkpoint '
            f'{work}/iter_4.pth (skipped as not intact: iter_8.pth: 0 bytes)') in log
    assert f'checkpoint {work}/iter_4.pth: loaded 9/9 keys' in log   # not "checkpoint the checkpoint"


def _with_nonfinite(state, keys):
    state = {k: v.clone() for k, v in state.items()}
    for index, key in enumerate(keys):
        state[key].view(-1)[0] = float('nan') if index % 2 == 0 else float('inf')
    return state


def test_test_tool_refuses_nan_weights_naming_the_keys(toy_checkpoint, tmp_path):
    bad = _saved(tmp_path, 'diverged.pth', _with_nonfinite(_toy_state(toy_checkpoint),
                                                           ['student.0.weight', 'teacher.3.bias']))
    with pytest.raises(ValueError) as error:
        test_tool.main([TOY_CONFIG, bad, '--work-dir', str(tmp_path / 'w')])
    message = str(error.value)
    assert 'diverged.pth: 2 tensor(s) hold NaN or inf: student.0.weight (1 NaN, 0 inf), teacher.3.bias ' \
           '(0 NaN, 1 inf)' in message and '--allow-nonfinite' in message
    metrics = test_tool.main([TOY_CONFIG, bad, '--work-dir', str(tmp_path / 'w'), '--allow-nonfinite'])
    assert np.isnan(metrics['mse'])   # what the refusal kept from being printed as a result


def test_gradcam_refuses_nan_weights_naming_the_keys(tmp_path):
    from vlp_codebook.engine.config import load_config
    from vlp_codebook.registry import MODELS
    from vlp_codebook.tools import gradcam
    config, image = _gradcam_inputs(tmp_path)
    state = MODELS.build(load_config(config).model).state_dict()
    keys = [k for k in state if k.startswith(('itm_head.', 'codebook_loss.', 'fusion_encoder.layer.0.'))
            and state[k].is_floating_point()]
    assert len(keys) > 5 and 'itm_head.classifier.weight' in keys and 'codebook_loss.codebook.weight' in keys
    bad = _saved(tmp_path, 'nan.pth', _with_nonfinite(state, keys))
    with pytest.raises(ValueError) as error:
        gradcam.main([config, bad, image, 'a red square', '--out', str(tmp_path / 'maps')])
    message = str(error.value)
    # the first five in the checkpoint's order, then the count of the others
    shown = ', '.join(f'{k} ({1 - i % 2} NaN, {i % 2} inf)' for i, k in enumerate(keys[:5]))
    assert f'nan.pth: {len(keys)} tensor(s) hold NaN or inf: {shown} and {len(keys) - 5} more.' in message
    assert f'and {len(keys) - 5} more' in message and '--allow-nonfinite' in message
    assert not (tmp_path / 'maps').exists()


def test_nan_scores_name_where_they_came_from():
    from vlp_codebook.evaluation.retrieval import RetrievalMetric
    metric = RetrievalMetric()
    embeds = torch.eye(4)
    embeds[2, 0] = float('nan')
    metric.process({}, [dict(image_embed=embeds[i], text_embeds=embeds[i:i + 1], image_id=10 + i) for i in range(4)])
    with pytest.raises(ValueError, match=r"the model's image embeddings hold NaN or inf for 1 of 4 images "
                                         r'\(image_id \[12\]\)'):
        metric.compute_metrics(metric.results)
    matrix = torch.eye(3)
    matrix[1, 2] = float('inf')
    with pytest.raises(ValueError, match=r'score_i2t \(the score matrices the model passed to RetrievalMetric\) '
                                         r'contains NaN or inf scores: 1 of 9 entries, in rows \[1\]'):
        metric.compute_metrics([dict(score_i2t=matrix, score_t2i=None, img2txt=[[0], [1], [2]])])


@pytest.mark.parametrize('tool, argv, words', [
    ('gradcam', ['missing_config.py', 'x.pth', 'x.png', 'a caption'], "FileNotFoundError: config 'missing_config.py'"),
    ('convert_albef', ['missing.pth', 'out.pth'], 'FileNotFoundError: '),
])
def test_gradcam_and_convert_albef_print_one_line_errors(tool, argv, words, tmp_path, monkeypatch, capsys):
    import runpy
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', [tool] + argv)
    monkeypatch.setenv('OMP_WAIT_POLICY', os.environ.get('OMP_WAIT_POLICY', 'PASSIVE'))
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_module(f'vlp_codebook.tools.{tool}', run_name='__main__', alter_sys=True)
    assert exit_status.value.code == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    assert err.splitlines()[0].startswith(f'vlp_codebook.tools.{tool}: error: {words}'), err


# ============================================================== 7. the plot tool runs no file it finds

def test_plot_tool_never_runs_a_py_file_of_the_work_dir(toy_checkpoint, tmp_path, capsys):
    from vlp_codebook.tools import plot as plot_tool
    work = tmp_path / 'w'
    shutil.copytree(Path(toy_checkpoint).parent, work)
    marker = tmp_path / 'code_ran'
    (work / 'zz_newest.py').write_text(f'open({str(marker)!r}, "w").close()\n')
    written = plot_tool.main([str(work), '--out', str(tmp_path / 'plots')])
    assert not marker.exists()
    assert 'losses.png' in [osp.basename(p) for p in written]
    assert f'no gallery: pass --config CONFIG (the config of the run: Python, executed; nothing in {work} ' \
        'is built)' in capsys.readouterr().out


def test_config_using_an_imported_name_gets_a_real_message(tmp_path, toy_checkpoint):
    from vlp_codebook.engine.config import load_config
    from vlp_codebook.tools import plot as plot_tool
    config = tmp_path / 'imports.py'
    config.write_text('import math\n_scale = math.sqrt(4)\nmodel = dict(type="ToyRegressor")\n')
    with pytest.raises(RuntimeError) as error:
        load_config(str(config))
    assert str(error.value).startswith(f"config {config}: a name it imports is used while the config is read "
                                       f"(line 2: '_scale = math.sqrt(4)')")
    assert 'lazy import' in str(error.value)
    with pytest.raises(RuntimeError, match='a name it imports is used while the config is read'):
        plot_tool.main([str(Path(toy_checkpoint).parent), '--config', str(config), '--out', str(tmp_path / 'p')])


# ============================================================== 3. corrupt checkpoint files

def _truncated(tmp_path, toy_checkpoint):
    data = Path(toy_checkpoint).read_bytes()
    return data[: len(data) // 2]


CORRUPT_CASES = [
    # (file contents, words the message must hold)
    ('truncated', 'is not a readable PyTorch checkpoint'),
    (b'', 'is not a readable PyTorch checkpoint'),
    (b'\x80\x04not really a pickle', 'is not a readable PyTorch checkpoint'),
    (b'version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n', 'Git LFS pointer'),
]


@pytest.mark.parametrize('contents, words', CORRUPT_CASES, ids=['truncated', 'empty', 'garbage', 'lfs-pointer'])
def test_corrupt_checkpoint_names_the_file_and_what_to_do(contents, words, tmp_path, toy_checkpoint):
    path = tmp_path / 'broken.pth'
    path.write_bytes(_truncated(tmp_path, toy_checkpoint) if contents == 'truncated' else contents)
    for trust in (False, True):
        with pytest.raises(CorruptCheckpointError) as error:
            read_checkpoint(path, trust=trust)
        assert str(path) in str(error.value) and words in str(error.value)
        assert 'Download or copy it again' in str(error.value)
    with pytest.raises(CorruptCheckpointError, match='broken.pth'):   # and through the test tool
        test_tool.main([TOY_CONFIG, str(path), '--work-dir', str(tmp_path / 'w')])


def test_corrupt_encoder_checkpoints_name_the_file(tmp_path):
    from vlp_codebook.models.encoders import ViTImageEncoder
    (tmp_path / 'vit.pth').write_bytes(b'garbage')
    with pytest.raises(CorruptCheckpointError, match=r'pretrained .*vit\.pth'):
        ViTImageEncoder(image_size=32, num_heads=2, pretrained=str(tmp_path / 'vit.pth'))
    (tmp_path / 'vit.safetensors').write_bytes(b'garbage')
    with pytest.raises(ValueError, match=r'vit\.safetensors is not a readable safetensors file'):
        ViTImageEncoder(image_size=32, num_heads=2, pretrained=str(tmp_path / 'vit.safetensors'))


# ============================================================== 4. configs

CONFIG_CASES = [
    # (--cfg-options, exception, words the message must hold)
    ('trian_cfg.max_iters=3', KeyError, ["top-level key 'trian_cfg'", "Did you mean 'train_cfg'"]),
    ('optim_wraper.clip_grad=None', KeyError, ["Did you mean 'optim_wrapper'"]),
    ('param_schedulers=[]', KeyError, ["Did you mean 'param_scheduler'"]),
    ('optim_wrapper.optimizer.type=AdamWW', KeyError, ["type='AdamWW'", "Did you mean 'AdamW'", 'Known types:', 'SGD']),
]


@pytest.mark.parametrize('option, exception, words', CONFIG_CASES, ids=[c[0].split('=')[0] for c in CONFIG_CASES])
def test_bad_config(option, exception, words, tmp_path):
    with pytest.raises(exception) as error:
        train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path), '--cfg-options', option])
    for word in words:
        assert word in error.value.args[0]


def test_helper_variables_and_every_shipped_config_pass_the_key_check(tmp_path):
    config = tmp_path / 'helpers.py'
    config.write_text(f"_base_ = [{TOY_CONFIG!r}]\nimage_size = 64\nmax_epochs = 3\n_trian_cfg = 1\n")
    load_config(str(config))
    for name in list_shipped_configs():
        load_config(name)


# ============================================================== 5. data

def _annotations(tmp_path, caption, encoding='utf-8'):
    path = tmp_path / 'ann.json'
    path.write_bytes(json.dumps([{'image': 'a.png', 'caption': caption}], ensure_ascii=False)
                     .encode(encoding, errors='surrogatepass'))
    return str(path)


@given(prefix=st.text(max_size=20), surrogate=st.integers(0xD800, 0xDFFF), suffix=st.text(max_size=20))
def test_caption_with_a_lone_surrogate_is_refused(prefix, surrogate, suffix):
    with pytest.raises(ValueError, match=f'lone surrogate .* \\(U\\+{surrogate:04X}\\)'):
        clean_caption(prefix + chr(surrogate) + suffix)


@given(st.text(st.characters(blacklist_categories=('Cs',)), max_size=60))
def test_any_valid_caption_cleans_to_encodable_text(text):
    cleaned = clean_caption(text, max_words=30)
    cleaned.encode('utf-8')
    assert cleaned == cleaned.lower().strip() and len(cleaned.split(' ')) <= 30


def test_dataset_names_the_entry_with_a_lone_surrogate(tmp_path):
    path = tmp_path / 'ann.json'
    path.write_text('[{"image": "a.png", "caption": "fine"}, {"image": "b.png", "caption": "bad \\udcff"}]')
    for dataset in (CaptionPretrainDataset, CaptionRetrievalDataset):
        with pytest.raises(ValueError, match=r"entry 1 of .*ann\.json: caption 'bad \\udcff' holds a lone surrogate"):
            dataset(str(path))


def test_latin1_annotation_file_is_named(tmp_path):
    path = _annotations(tmp_path, 'un café au lait', encoding='latin-1')
    with pytest.raises(ValueError, match=r'ann\.json is not UTF-8: byte 0xe9 at offset \d+ \(line 1\).*iconv'):
        CaptionPretrainDataset(path)
    # UTF-8, with or without a byte-order mark, is read
    assert len(CaptionPretrainDataset(_annotations(tmp_path, 'un café', encoding='utf-8-sig'))) == 1


def _gradient(dtype, high):
    return (np.linspace(0, 1, 32 * 32).reshape(32, 32) * high).astype(dtype)


@pytest.mark.parametrize('name, array, mode', [
    ('grey16.png', _gradient(np.uint16, 65535), 'I;16'),
    ('grey16.tif', _gradient(np.uint16, 65535), 'I;16'),
    ('float01.tif', _gradient(np.float32, 1.0), 'F'),
])
def test_high_bit_depth_images_are_scaled_not_saturated(name, array, mode, tmp_path):
    path = tmp_path / name
    Image.fromarray(array).save(path)
    with Image.open(path) as image:
        assert image.mode == mode
    loaded = load_image(str(path), 32)
    expected = torch.from_numpy(array.astype(np.float64) / array.max()).float()
    for channel in loaded:   # grey: the same in R, G, B; within one 8-bit step of the true value
        torch.testing.assert_close(channel, expected, rtol=0, atol=1 / 255 + 1e-6)


@given(st.integers(0, 65535))
def test_sixteen_bit_grey_maps_to_value_over_65535(value):
    from vlp_codebook.datasets.image_loading import pil_to_tensor
    image = Image.fromarray(np.full((2, 2), value, dtype=np.uint16))
    assert abs(pil_to_tensor(image)[0, 0, 0].item() - value / 65535) <= 0.5 / 255 + 1e-6


@given(dtype=st.sampled_from(['uint8', 'uint16', 'float32']), height=st.integers(1, 12), width=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_any_grey_image_reads_as_its_fraction_of_full_scale(dtype, height, width, seed):
    # any shape, 8-bit, 16-bit or [0, 1] float: each pixel reads as value / full scale (one 8-bit step)
    from vlp_codebook.datasets.image_loading import pil_to_tensor
    rng = np.random.default_rng(seed)
    full = {'uint8': 255, 'uint16': 65535, 'float32': 1.0}[dtype]
    array = (rng.random((height, width)) * full).astype(dtype)
    tensor = pil_to_tensor(Image.fromarray(array))
    assert tensor.shape == (3, height, width)
    expected = torch.from_numpy(array.astype(np.float64) / full).float()
    torch.testing.assert_close(tensor[1], expected, rtol=0, atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize('name, array, words', [
    ('float255.tif', _gradient(np.float32, 255.0), 'values in [0, 255]'),
    ('negative.tif', _gradient(np.float32, 1.0) - 0.5, 'values in [-0.5, 0.5]'),
    ('int32.tif', _gradient(np.int32, 100000), '32-bit integer image'),
])
def test_images_of_unknown_range_are_refused(name, array, words, tmp_path):
    path = tmp_path / name
    Image.fromarray(array).save(path)
    with pytest.raises(ValueError) as error:
        load_image(str(path), 32)
    assert str(path) in str(error.value) and words in str(error.value)
