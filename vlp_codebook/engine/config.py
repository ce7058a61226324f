"""Finding and loading the config a tool is given: a path, or the name of a shipped config.

The package ships the repository's ``configs/`` as package data under
``vlp_codebook/.mim/configs/`` (in a checkout this is a symlink to ``../../configs``), so a
regular install -- where ``mim run vlp_codebook train CONFIG`` runs -- can train a config by
name without the repository at hand. :func:`resolve_config` accepts, in this order:

1. an existing file path (``my_configs/codis_small.py``);
2. a path relative to the shipped configs, with or without ``.py`` and with or without a
   leading ``configs/`` (``codis_demo``, ``configs/codis_demo.py``, ``ablations/row_a``).

Usage::

    >>> from vlp_codebook.engine.config import load_config
    >>> cfg = load_config('codis_demo', cfg_options={'train_cfg.max_iters': 10})
    >>> cfg.default_scope
    'vlp_codebook'
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from mmengine.config import Config

from vlp_codebook.registry import SCOPE

__all__ = ['shipped_configs_dir', 'list_shipped_configs', 'resolve_config', 'load_config']


def shipped_configs_dir() -> Path:
    """``vlp_codebook/.mim/configs`` of the imported package (may not exist in a bare checkout)."""
    return Path(__file__).resolve().parent.parent / '.mim' / 'configs'


def list_shipped_configs() -> List[str]:
    """Names of the shipped configs (relative to :func:`shipped_configs_dir`, no ``.py``; no ``_*``)."""
    root = shipped_configs_dir()
    if not root.is_dir():
        return []
    names = (path.relative_to(root) for path in root.rglob('*.py'))
    # '_base_/...' fragments and private files are not meant to be trained on their own
    return sorted(name.with_suffix('').as_posix() for name in names
                  if not any(part.startswith('_') for part in name.parts))


def resolve_config(config: str) -> Path:
    """The config file that ``config`` (a path or a shipped config's name) refers to.

    Raises:
        FileNotFoundError: nothing found; the message lists every place that was tried and the
            names of the shipped configs.
    """
    config = os.fspath(config)
    tried: List[str] = []
    direct = Path(config).expanduser()
    tried.append(str(direct.resolve()))
    if direct.is_file():
        return direct.resolve()
    root = shipped_configs_dir()
    names = [config]
    normalised = config.replace(os.sep, '/')
    if normalised.startswith('configs/'):
        names.append(normalised[len('configs/'):])
    for name in names:
        for candidate_name in (name, name if name.endswith('.py') else name + '.py'):
            candidate = root / candidate_name
            if str(candidate) not in tried:
                tried.append(str(candidate))
            if candidate.is_file():
                return candidate.resolve()
    known = list_shipped_configs()
    raise FileNotFoundError(
        f'config {config!r} not found. Looked at: {", ".join(tried)}. '
        f'Shipped configs ({root}): {", ".join(known) if known else "none"}')


def load_config(config: str, cfg_options: Optional[Dict] = None) -> Config:
    """Load ``config`` (see :func:`resolve_config`), merge ``cfg_options``, default the scope.

    ``default_scope`` is set to ``'vlp_codebook'`` when the config has none, so the Runner
    builds ``type='CODIS'`` & co. from our registries (and still finds mmengine's own types).
    """
    cfg = Config.fromfile(str(resolve_config(config)))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if not cfg.get('default_scope'):
        cfg.default_scope = SCOPE
    return cfg
