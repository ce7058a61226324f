"""Fixtures of the open_clip plugin tests: a tab-separated CSV of real emoji image-caption pairs
(open_clip's ``--dataset-type csv``) and a way to run the plugin's entry point.

These tests are never skipped: ``scripts/setup_env.sh test`` installs open_clip 3.3.0; where it
(or the plugin) does not import, they fail with the reason.
"""
from __future__ import annotations

import os.path as osp
import sys

import pytest

from openclip_helpers import PLUGIN_CONFIGS, ROOT


@pytest.fixture(scope='session')
def openclip_plugin():
    try:
        import vlp_codebook_openclip
    except ImportError as error:
        pytest.fail(f'open_clip or the vlp_codebook_openclip plugin does not import: {error}\n'
                    'Install with `bash scripts/setup_env.sh test`.', pytrace=False)
    import open_clip
    open_clip.add_model_config(PLUGIN_CONFIGS)
    return vlp_codebook_openclip


@pytest.fixture(scope='session')
def emoji_csv(tmp_path_factory):
    """The first 256 caption pairs of the emoji train split as an open_clip CSV (the data is built
    with ``prepare_emoji`` on first use, as the real-data benchmark does)."""
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    from emoji_data import ensure_data
    data_dir = osp.join(ROOT, 'data', 'emoji')
    ensure_data(data_dir)
    import json
    with open(osp.join(data_dir, 'train.json'), encoding='utf-8') as handle:
        entries = json.load(handle)[:256]
    path = tmp_path_factory.mktemp('openclip_csv') / 'train.csv'
    from vlp_codebook_openclip.csv_from_json import write_csv
    assert write_csv(entries, data_dir, str(path)) == 256
    return str(path)
