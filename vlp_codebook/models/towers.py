"""Encoder + projection pairs: the unit a momentum teacher copies.

A tower returns both the token states (for the fusion encoder) and the unit-norm embedding
of the [CLS] token in the shared space (for contrastive, distillation and codebook losses).
Keeping encoder and projection in one module means ``MomentumTeacher(tower)`` copies exactly
what ALBEF's momentum encoders copy.

Example::

    >>> import torch
    >>> from vlp_codebook.registry import MODELS
    >>> from vlp_codebook.models.towers import ImageTower
    >>> encoder = MODELS.build(dict(type='ViTImageEncoder', image_size=32, patch_size=8,
    ...                             hidden_size=32, num_layers=1, num_heads=4))
    >>> tower = ImageTower(encoder, embed_dim=16)
    >>> tokens, z = tower(torch.rand(2, 3, 32, 32))   # (2, 17, 32), (2, 16) unit-norm
"""
from __future__ import annotations

from typing import Mapping, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from vlp_codebook.models.encoders.projection import Projection
from vlp_codebook.registry import MODELS

__all__ = ['ImageTower', 'TextTower', 'build_module']


def build_module(cfg: Union[nn.Module, Mapping], name: str, **default_args) -> nn.Module:
    """``cfg`` itself if it is a module, else ``MODELS.build(cfg, default_args)``; ``name`` is the
    argument named in the error for anything else."""
    if isinstance(cfg, nn.Module):
        return cfg
    if not isinstance(cfg, Mapping):
        raise TypeError(f'{name} must be a module or a config dict, got {type(cfg).__name__}')
    return MODELS.build(dict(cfg), default_args=default_args or None)


class ImageTower(nn.Module):
    """Image encoder + linear projection of its [CLS] token.

    Shapes: images (N, 3, H, W) -> tokens (N, 1 + P, D_v), embedding (N, embed_dim) unit norm.
    """

    def __init__(self, encoder: Union[nn.Module, Mapping], embed_dim: int):
        super().__init__()
        self.encoder = build_module(encoder, 'image_encoder')
        self.proj = Projection(self.encoder.width, embed_dim)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.encoder(images)
        return tokens, F.normalize(self.proj(tokens[:, 0]).float(), dim=-1)


class TextTower(nn.Module):
    """Text encoder + linear projection of its [CLS] token.

    Shapes: input_ids, attention_mask (N, L) -> hidden (N, L, D_t), embedding (N, embed_dim).
    """

    def __init__(self, encoder: Union[nn.Module, Mapping], embed_dim: int):
        super().__init__()
        self.encoder = build_module(encoder, 'text_encoder')
        self.proj = Projection(self.encoder.width, embed_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids, attention_mask)
        return hidden, F.normalize(self.proj(hidden[:, 0]).float(), dim=-1)
