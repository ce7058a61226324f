r"""Linear projection into the shared image-text embedding space (ALBEF/CODIS: 256-d).

:math:`z = W h + b`, optionally L2-normalised: :math:`z / \lVert z \rVert_2`. In ALBEF the
[CLS] token of each unimodal encoder is projected this way (``vision_proj``, ``text_proj``) and
normalised before contrastive, distillation and codebook losses.

Example::

    >>> import torch
    >>> from vlp_codebook.registry import MODELS
    >>> proj = MODELS.build(dict(type='Projection', in_dim=768, out_dim=256, normalize=True))
    >>> z = proj(torch.randn(4, 768))       # (4, 256), unit rows
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vlp_codebook.registry import MODELS

__all__ = ['Projection']


@MODELS.register_module()
class Projection(nn.Module):
    """Linear map ``in_dim -> out_dim`` (+ optional L2 normalisation of the output).

    Args:
        in_dim: input width (the encoder's ``width``).
        out_dim: embedding width (256 in the paper).
        normalize: L2-normalise the output along the last dimension (computed in fp32).
        bias: learn a bias.

    Shapes:
        forward: (..., in_dim) -> (..., out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, normalize: bool = False, bias: bool = True):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f'in_dim and out_dim must be positive, got in_dim={in_dim}, out_dim={out_dim}')
        self.in_dim, self.out_dim, self.normalize = in_dim, out_dim, normalize
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f'Projection expects inputs of width in_dim={self.in_dim}, got shape {tuple(x.shape)}')
        z = self.linear(x)
        # Unit norm in fp32: a bf16 norm is off by ~1e-2, too coarse for similarity / temperature.
        return F.normalize(z.float(), dim=-1) if self.normalize else z
