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

import difflib
import os
from pathlib import Path
from typing import Dict, List, Optional

from mmengine.config import Config

from vlp_codebook.registry import SCOPE

__all__ = ['shipped_configs_dir', 'list_shipped_configs', 'resolve_config', 'load_config', 'RUNNER_KEYS',
           'check_top_level_keys', 'check_optimizer_types']

#: top-level keys the mmengine Runner (``Runner.from_cfg``) and our tools read
RUNNER_KEYS = (
    'model', 'work_dir', 'train_dataloader', 'val_dataloader', 'test_dataloader', 'train_cfg', 'val_cfg',
    'test_cfg', 'auto_scale_lr', 'optim_wrapper', 'param_scheduler', 'val_evaluator', 'test_evaluator',
    'default_hooks', 'custom_hooks', 'data_preprocessor', 'load_from', 'resume', 'launcher', 'env_cfg',
    'log_processor', 'log_level', 'visualizer', 'default_scope', 'randomness', 'experiment_name',
    'runner_type', 'model_wrapper_cfg', 'custom_imports', 'compile', 'strategy', 'load_from_expected_missing',
)


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
    """The config file that ``config`` (a path or a shipped config's name) refers to; else
    ``FileNotFoundError`` listing every place tried and the shipped configs' names."""
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
    """Load ``config`` (see :func:`resolve_config`), merge ``cfg_options``, check the top-level keys
    and optimizer types (``KeyError`` naming close matches), and default ``default_scope`` to
    ``'vlp_codebook'`` so the Runner builds ``type='CODIS'`` & co. from our registries."""
    path = resolve_config(config)
    try:
        cfg = Config.fromfile(str(path))
    except RuntimeError as error:
        if str(error).strip():
            raise
        raise _explain_empty_error(error, path) from error
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    check_top_level_keys(cfg, str(path))
    check_optimizer_types(cfg, str(path))
    if not cfg.get('default_scope'):
        cfg.default_scope = SCOPE
    return cfg


def _explain_empty_error(error: BaseException, path: Path) -> RuntimeError:
    """mmengine's message-less ``RuntimeError()`` from a config that uses what it imports.

    A config with ``import`` lines is read in mmengine's "lazy import" mode: imported names are
    placeholders, and calling one (``math.sqrt(4)``) raises ``RuntimeError()`` without a message.
    """
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == str(path)]
    where = f' (line {frames[-1].lineno}: {frames[-1].line!r})' if frames and frames[-1].line else ''
    return RuntimeError(
        f'config {path}: a name it imports is used while the config is read{where}. mmengine reads a config '
        'with import lines in its "lazy import" mode, where imported modules and functions are only '
        'placeholders for building objects later. Write the value itself instead (e.g. 2.0 for math.sqrt(4)), '
        'or remove the import line.')


def check_top_level_keys(cfg: Config, source: str = 'the config') -> None:
    """Raise ``KeyError`` for a top-level key that is a near miss of one the Runner reads.

    A config may define helper variables (``image_size = 384``) the Runner never reads, so an
    unknown key alone is fine; but ``trian_cfg`` next to no ``train_cfg`` is a typo that would be
    silently ignored (mmengine would train with the defaults, or not at all). A key is refused
    when it is not one of :data:`RUNNER_KEYS` and :func:`difflib.get_close_matches` (cutoff 0.8)
    finds one of them for it. Keys starting with ``_`` are never checked.
    """
    for key in cfg.keys():
        if key in RUNNER_KEYS or key.startswith('_'):
            continue
        close = difflib.get_close_matches(key, RUNNER_KEYS, n=2, cutoff=0.8)
        if close:
            raise KeyError(f'{source}: top-level key {key!r} is not one the Runner reads, so it would be '
                           f'silently ignored. Did you mean {" or ".join(map(repr, close))}? (A helper '
                           f'variable of your own? Start its name with "_".) Keys the Runner reads: '
                           f'{", ".join(RUNNER_KEYS)}')


def _optimizer_cfgs(wrapper) -> List[dict]:
    if not isinstance(wrapper, dict):
        return []
    if isinstance(wrapper.get('optimizer'), dict):
        return [wrapper['optimizer']]
    # several optimizers: optim_wrapper = dict(constructor=..., generator=dict(optimizer=...), ...)
    return [sub['optimizer'] for sub in wrapper.values()
            if isinstance(sub, dict) and isinstance(sub.get('optimizer'), dict)]


def check_optimizer_types(cfg: Config, source: str = 'the config') -> None:
    """Raise ``KeyError`` listing the known optimizers when ``optim_wrapper.optimizer.type`` is
    not one (mmengine itself fails later with ``TypeError: None is not a callable object``)."""
    from vlp_codebook.registry import OPTIMIZERS, unknown_type_message
    import mmengine.optim  # noqa: F401  (registers torch's optimizers in mmengine's registry)

    for optimizer in _optimizer_cfgs(cfg.get('optim_wrapper')):
        type_name = optimizer.get('type')
        if isinstance(type_name, str) and OPTIMIZERS.get(type_name) is None:
            raise KeyError(f'{source}: optim_wrapper.optimizer: {unknown_type_message(OPTIMIZERS, type_name)}')
