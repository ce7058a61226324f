"""Fixtures of the LAVIS adapter tests.

These tests are never skipped: CI installs LAVIS with ``plugins/install_lavis.sh``. Where LAVIS
(or the plugin) does not import, every test fails with the reason and the install command.
"""
from __future__ import annotations

import json

import pytest

from lavis_helpers import COLOURS

@pytest.fixture(scope='session')
def lavis_plugin():
    """The imported ``vlp_codebook_lavis`` package (fails, never skips, when it cannot import)."""
    try:
        import vlp_codebook_lavis
    except ImportError as error:
        pytest.fail(f'LAVIS or the vlp_codebook_lavis plugin does not import: {error}\n'
                    'Install LAVIS with `bash plugins/install_lavis.sh .venv/bin/python` and the '
                    'project with `pip install -e .` (see docs/lavis.md).', pytrace=False)
    return vlp_codebook_lavis


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A directory in LAVIS's COCO-Karpathy retrieval format: images/ and annotations/*.json."""
    from PIL import Image
    root = tmp_path_factory.mktemp('codis_tiny_data')
    (root / 'images').mkdir()
    (root / 'annotations').mkdir()
    train, evaluation = [], []
    for name, rgb in COLOURS.items():
        Image.new('RGB', (40, 40), rgb).save(root / 'images' / f'{name}.png')
        captions = [f'a {name} square', f'a picture that is all {name}']
        train += [dict(image=f'{name}.png', caption=c, image_id=name) for c in captions]
        evaluation.append(dict(image=f'{name}.png', caption=captions))
    for split, anns in (('train', train), ('val', evaluation), ('test', evaluation)):
        (root / 'annotations' / f'{split}.json').write_text(json.dumps(anns))
    return root


@pytest.fixture
def data_env(tiny_data, monkeypatch):
    """``CODIS_DATA_DIR`` set for the tiny run config's ``${oc.env:CODIS_DATA_DIR}``."""
    monkeypatch.setenv('CODIS_DATA_DIR', str(tiny_data))
    return tiny_data

