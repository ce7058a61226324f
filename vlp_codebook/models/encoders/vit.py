r"""ViT image encoder: images (N, 3, H, W) -> tokens (N, 1 + P, D), [CLS] first.

Dosovitskiy et al.'s ViT as ALBEF/CODIS use it (ViT-B/16: D = 768, 12 layers, 12 heads):
:math:`P = (H/p)(W/p)` patch embeddings after a [CLS] token, learned position embeddings,
pre-norm layers, final LayerNorm. Built on transformers' ``ViTModel`` (no pooler).

``pretrained=``: a LOCAL transformers ViT directory or a state-dict file, of a ``ViTModel`` or in
timm's layout (DeiT, ALBEF's ``visual_encoder``; :mod:`.timm_vit`); a file's sizes are read off
its tensors (all but ``num_heads``). Position embeddings of another grid are resized bicubically
(ALBEF's ``interpolate_pos_embed``) at construction, in ``load_state_dict`` (so mmengine's
``load_from`` works across sizes) and on the fly for inputs of another size.

Example::

    >>> import torch
    >>> from vlp_codebook.registry import MODELS
    >>> vit = MODELS.build(dict(type='ViTImageEncoder', image_size=32, patch_size=8,
    ...                         hidden_size=32, num_layers=1, num_heads=4))
    >>> vit(torch.randn(2, 3, 32, 32)).shape          # 1 + (32/8)**2 tokens
    torch.Size([2, 17, 32])
"""
from __future__ import annotations

import logging
import math
import re
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from vlp_codebook.registry import MODELS

from .pretrained import load_matching, read_config, read_state_dict, resolve_architecture, strip_prefix
from .timm_vit import is_timm_vit, timm_vit_to_transformers, vit_sizes_from_weights

__all__ = ['ViTImageEncoder']

logger = logging.getLogger(__name__)

VIT_B16 = dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_ratio=4)
CONFIG_KEYS = dict(patch_size='patch_size', hidden_size='hidden_size', num_layers='num_hidden_layers',
                   num_heads='num_attention_heads')


@MODELS.register_module()
class ViTImageEncoder(nn.Module):
    """Vision Transformer returning all tokens.

    Args:
        image_size, patch_size, hidden_size, num_layers, num_heads, mlp_ratio: ViT-B/16 by default
            (224, 16, 768, 12, 12, 4; ALBEF pretrains at 256); sizes left ``None`` come from
            ``pretrained`` (its config.json, else its tensors' shapes).
        pretrained: LOCAL directory or file with weights (see module docstring), or None.
        drop_rate: dropout on hidden states (default 0).
        layer_norm_eps: LayerNorm epsilon (default 1e-6, as timm/ALBEF; a checkpoint's config wins).

    Shapes: forward: images (N, 3, H, W) float -> (N, 1 + (H/p)(W/p), D).
    Attributes: ``width`` D, ``num_patches`` P at ``image_size``.
    """

    def __init__(self, image_size: Optional[int] = None, patch_size: Optional[int] = None,
                 hidden_size: Optional[int] = None, num_layers: Optional[int] = None,
                 num_heads: Optional[int] = None, mlp_ratio: Optional[float] = None,
                 pretrained: Optional[str] = None, drop_rate: float = 0.0, layer_norm_eps: float = 1e-6):
        super().__init__()
        state, ckpt_config, ckpt_sizes = None, None, None
        if pretrained is not None:
            state = vit_model_names(read_state_dict(pretrained))
            ckpt_config = read_config(pretrained)
            # A bare state-dict file has no config.json: its tensors' shapes give the sizes.
            ckpt_sizes = ckpt_config if ckpt_config is not None else vit_sizes_from_weights(state)
        given = dict(patch_size=patch_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads)
        sizes = resolve_architecture(given, ckpt_sizes, VIT_B16, CONFIG_KEYS, pretrained,
                                     'config.json' if ckpt_config is not None else 'weights')
        if mlp_ratio is None:
            if ckpt_sizes is not None and 'intermediate_size' in ckpt_sizes:
                mlp_ratio = ckpt_sizes['intermediate_size'] / sizes['hidden_size']
            else:
                mlp_ratio = VIT_B16['mlp_ratio']
        image_size = image_size if image_size is not None else VIT_B16['image_size']
        if image_size % sizes['patch_size']:
            raise ValueError(f'image_size={image_size} is not a multiple of patch_size={sizes["patch_size"]}')
        if sizes['hidden_size'] % sizes['num_heads']:
            raise ValueError(f'hidden_size={sizes["hidden_size"]} is not divisible by num_heads={sizes["num_heads"]}')

        from transformers import ViTConfig, ViTModel  # lazily: see BertTextEncoder

        config = ViTConfig.from_dict(dict(ckpt_config or {}))
        config.update(dict(
            image_size=image_size, patch_size=sizes['patch_size'], hidden_size=sizes['hidden_size'],
            num_hidden_layers=sizes['num_layers'], num_attention_heads=sizes['num_heads'],
            intermediate_size=int(round(mlp_ratio * sizes['hidden_size'])), num_channels=3))
        if ckpt_config is None:
            config.update(dict(hidden_dropout_prob=drop_rate, attention_probs_dropout_prob=drop_rate,
                               layer_norm_eps=layer_norm_eps, qkv_bias=True))
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.image_size = image_size
        self.patch_size = sizes['patch_size']
        self.width = sizes['hidden_size']
        self.num_patches = (image_size // self.patch_size) ** 2
        if state is not None:
            self._load(state, pretrained)

    def _load(self, state, source: str) -> None:
        key = 'embeddings.position_embeddings'
        if key in state and state[key].shape != self.vit.embeddings.position_embeddings.shape:
            state = dict(state)
            state[key] = resize_position_embeddings(state[key], self.num_patches)
        load_matching(self.vit, state, source)

    def can_load_shape(self, name: str, shape) -> bool:
        """Whether a checkpoint tensor ``name`` (relative to this module) of another ``shape`` still
        loads: a position grid of another image size (same width) is resized on load."""
        own = self.vit.embeddings.position_embeddings
        return (name == 'vit.embeddings.position_embeddings' and len(shape) == 3 and shape[0] == 1
                and shape[-1] == own.shape[-1])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of another image size (pretraining at 256 px, fine-tuning at 384) carry
        # another position grid: resize it, as ALBEF's interpolate_pos_embed, rather than let a
        # non-strict load (mmengine's load_from) skip it and leave the grid random. Runs before
        # the children load; ``state_dict`` is the loader's own copy.
        key = prefix + 'vit.embeddings.position_embeddings'
        own = self.vit.embeddings.position_embeddings
        incoming = state_dict.get(key)
        if (incoming is not None and incoming.dim() == 3 and incoming.shape[-1] == own.shape[-1]
                and incoming.shape[1] != own.shape[1]):
            state_dict[key] = resize_position_embeddings(incoming, self.num_patches)
            logger.info('%s: position embeddings resized from %d to %d patches', key, incoming.shape[1] - 1,
                        self.num_patches)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float images (normalised) -> (N, 1 + P, D) tokens, [CLS] first."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f'images must be a (N, 3, H, W) tensor, got shape {tuple(getattr(images, "shape", ()))}')
        if not images.is_floating_point():
            raise ValueError(f'images must be float (normalised by the data preprocessor), got {images.dtype}')
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f'image size {height}x{width} is not a multiple of patch_size={self.patch_size}')
        other_size = (height, width) != (self.image_size, self.image_size)
        images = images.to(self.vit.embeddings.patch_embeddings.projection.weight.dtype)
        out = self.vit(pixel_values=images, interpolate_pos_encoding=other_size)
        return out.last_hidden_state


# Enough ViTModel names to locate the ViT inside a larger checkpoint (ALBEF, mmengine, CODIS).
_VIT_KEYS = ('embeddings.cls_token', 'embeddings.position_embeddings',
             'embeddings.patch_embeddings.projection.weight', 'layernorm.weight', 'layernorm.bias')
_PREFIXES = ('vit.', 'visual_encoder.', 'image_encoder.vit.', 'model.')
_QUERY_KEY = re.compile(r'encoder\.layer\.\d+\.attention\.attention\.query\.weight$')


def vit_model_names(state):
    """A checkpoint's ViT weights named relative to transformers' ``ViTModel``: a timm layout
    (DeiT, ALBEF) is converted, a transformers one has its prefix stripped."""
    if is_timm_vit(state):
        return timm_vit_to_transformers(state, ('visual_encoder.',) + _PREFIXES)
    expected = _VIT_KEYS + tuple({m.group(0) for m in map(_QUERY_KEY.search, state) if m})
    return strip_prefix(state, expected, _PREFIXES)


def resize_position_embeddings(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(1, 1 + P_old, D) -> (1, 1 + num_patches, D): bicubic resize of the patch grid, [CLS] kept."""
    cls_pos, grid = pos[:, :1], pos[:, 1:]
    old_side, new_side = int(math.isqrt(grid.shape[1])), int(math.isqrt(num_patches))
    if old_side ** 2 != grid.shape[1] or new_side ** 2 != num_patches:
        raise ValueError(f'cannot resize position embeddings of {grid.shape[1]} patches to {num_patches}: '
                         'both must be square grids')
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, num_patches, dim).to(pos.dtype)
    return torch.cat([cls_pos, grid], dim=1)
