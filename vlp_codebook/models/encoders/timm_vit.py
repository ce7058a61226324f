"""ViT weights in timm's layout (DeiT, ALBEF's ``visual_encoder``) renamed for transformers' ``ViTModel``.

The two layouts hold the same pre-norm transformer; only timm fuses query, key and value into one
``qkv`` matrix whose rows are ``[W_q; W_k; W_v]``:

==================================  ==========================================================
timm                                transformers ``ViTModel``
==================================  ==========================================================
``cls_token``, ``pos_embed``        ``embeddings.cls_token``, ``embeddings.position_embeddings``
``patch_embed.proj``                ``embeddings.patch_embeddings.projection``
``blocks.i.norm1`` / ``norm2``      ``encoder.layer.i.layernorm_before`` / ``layernorm_after``
``blocks.i.attn.qkv`` (3D x D)      ``encoder.layer.i.attention.attention.{query,key,value}``
``blocks.i.attn.proj``              ``encoder.layer.i.attention.output.dense``
``blocks.i.mlp.fc1`` / ``fc2``      ``encoder.layer.i.intermediate.dense`` / ``output.dense``
``norm``                            ``layernorm``
==================================  ==========================================================

The classifier (``head``, ``pre_logits``) is dropped. Anything else (a distillation token,
LayerScale, q/k norms) belongs to another architecture and raises rather than being dropped.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Sequence

import torch

from .pretrained import strip_prefix

__all__ = ['is_timm_vit', 'timm_vit_to_transformers', 'vit_sizes_from_weights']

_TOP_LEVEL = {
    'cls_token': 'embeddings.cls_token',
    'pos_embed': 'embeddings.position_embeddings',
    'patch_embed.proj.weight': 'embeddings.patch_embeddings.projection.weight',
    'patch_embed.proj.bias': 'embeddings.patch_embeddings.projection.bias',
    'norm.weight': 'layernorm.weight',
    'norm.bias': 'layernorm.bias',
}
_IN_BLOCK = {
    'norm1': 'layernorm_before',
    'norm2': 'layernorm_after',
    'attn.proj': 'attention.output.dense',
    'mlp.fc1': 'intermediate.dense',
    'mlp.fc2': 'output.dense',
}
_CLASSIFIER = ('head.', 'head_dist.', 'pre_logits.')
_BLOCK_KEY = re.compile(r'blocks\.(\d+)\.(.+)\.(weight|bias)$')


def is_timm_vit(state: Mapping[str, torch.Tensor]) -> bool:
    """True if ``state`` holds a timm-layout ViT (under any prefix)."""
    return any(k == 'blocks.0.attn.qkv.weight' or k.endswith('.blocks.0.attn.qkv.weight') for k in state)


def timm_vit_to_transformers(state: Mapping[str, torch.Tensor],
                             prefixes: Sequence[str] = ('visual_encoder.', 'module.', 'model.')) -> Dict[str, torch.Tensor]:
    """Rename a timm ViT state dict to transformers ``ViTModel`` names (see the module docstring).

    Args:
        state: the checkpoint's tensors; the ViT may sit under a prefix (``visual_encoder.``
            in ALBEF, whose momentum copy ``visual_encoder_m.`` is ignored).
        prefixes: preferred prefixes when several hold a ViT equally well.

    Returns:
        name -> tensor relative to ``ViTModel`` (no pooler).

    Raises:
        ValueError: keys of another architecture (distillation token, LayerScale, ...), named.
    """
    depth = 1 + max((int(m.group(1)) for m in map(_BLOCK_KEY.search, state) if m), default=-1)
    expected = set(_TOP_LEVEL) | {f'blocks.{i}.attn.qkv.weight' for i in range(depth)}
    state = strip_prefix(state, expected, prefixes)
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
            continue
        if key.startswith(_CLASSIFIER):
            continue
        match = _BLOCK_KEY.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        index, module, kind = match.groups()
        layer = f'encoder.layer.{index}.'
        if module == 'attn.qkv':
            if value.shape[0] % 3:
                raise ValueError(f'{key} has {value.shape[0]} rows, not 3 x hidden_size')
            for name, part in zip(('query', 'key', 'value'), value.chunk(3, dim=0)):
                out[f'{layer}attention.attention.{name}.{kind}'] = part.clone()
        elif module in _IN_BLOCK:
            out[f'{layer}{_IN_BLOCK[module]}.{kind}'] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f'timm ViT checkpoint has {len(unknown)} weight(s) the ViT-B/16 layout of ALBEF/DeiT '
                         f'does not have (another architecture, e.g. a distilled DeiT or LayerScale): '
                         f'{sorted(unknown)[:8]}')
    return out


def vit_sizes_from_weights(state: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """Architecture sizes readable from ``ViTModel``-named weights, as config.json keys.

    ``patch_size``, ``hidden_size`` (from the patch projection), ``num_hidden_layers`` and
    ``intermediate_size``; the number of heads is not recorded in the weights.
    """
    sizes: Dict[str, int] = {}
    projection = state.get('embeddings.patch_embeddings.projection.weight')
    if projection is not None and projection.dim() == 4:
        sizes['hidden_size'], sizes['patch_size'] = int(projection.shape[0]), int(projection.shape[-1])
    layers = {int(m.group(1)) for m in (re.match(r'encoder\.layer\.(\d+)\.', k) for k in state) if m}
    if layers:
        sizes['num_hidden_layers'] = max(layers) + 1
    fc1 = state.get('encoder.layer.0.intermediate.dense.weight')
    if fc1 is not None:
        sizes['intermediate_size'] = int(fc1.shape[0])
    return sizes
