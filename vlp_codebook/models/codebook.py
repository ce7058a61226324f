r"""A learnable multimodal codebook: K codewords shared by image and text features.

CODIS (Duan et al., CVPR 2022) aligns both modalities to one set of codewords
:math:`C \in \mathbb{R}^{K \times d}`; rows are L2-normalised whenever they are used, so the
cost of assigning a unit-norm feature ``z`` to codeword ``k`` is :math:`1 - z \cdot c_k`.

The parameter's norm sets how fast a codeword's direction moves under Adam-type optimisers: a
codeword of norm :math:`r` turns by about :math:`\mathrm{lr}\sqrt{d}/r` radians per step, so
N(0, 1) entries (the default, :math:`r \approx \sqrt{d}`) turn by about ``lr`` and unit-norm ones
(``init_norm=1.0``, what :class:`CodebookOTLoss` uses) :math:`\sqrt{d}` times faster; the
measurements behind the choice are in docs/ot_and_codebook.md. :meth:`Codebook.update_usage`
keeps an EMA of the mass each codeword receives; :meth:`Codebook.perplexity` is
:math:`\exp(H(\text{mass}))`, from 1 (one codeword used) to K (all used equally).

Example::

    >>> import torch
    >>> from vlp_codebook.models.codebook import Codebook
    >>> codebook = Codebook(num_codewords=128, embed_dim=32)
    >>> z = torch.nn.functional.normalize(torch.randn(8, 32), dim=1)
    >>> cost = codebook.cost(z)              # (8, 128), values in [0, 2]
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from vlp_codebook import dist
from vlp_codebook.checks import check_finite
from vlp_codebook.models.losses.functional import l2_normalize
from vlp_codebook.registry import MODELS

__all__ = ['Codebook', 'check_features', 'entropy']


def entropy(p: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last dimension of distributions ``p`` (zeros contribute nothing)."""
    return -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)


def check_features(name: str, feats: torch.Tensor, embed_dim: int, values: bool = True) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``feats`` is a finite (N, embed_dim) tensor
    (the finiteness through :func:`vlp_codebook.checks.check_finite`: one read per step in CODIS).
    ``values=False``: the shape only (the caller checks the values with a fused flag)."""
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
        raise ValueError(f'{name} must be a 2-D tensor (batch, embed_dim), got '
                         f'{type(feats).__name__} of shape {tuple(getattr(feats, "shape", ()))}')
    if feats.shape[1] != embed_dim:
        raise ValueError(f'{name} has feature dimension {feats.shape[1]}, but the codebook expects '
                         f'embed_dim={embed_dim} (shape {tuple(feats.shape)})')
    if values:
        check_finite(name, feats)  # a device flag inside vlp_codebook.checks.deferred_checks


@MODELS.register_module()
class Codebook(nn.Module):
    r"""K learnable codewords of dimension d, L2-normalised when used. The paper does not state its
    K; its ablation brackets it between 500 (worse) and 3000. ``init_norm``: None for N(0, 1)
    entries, else random directions of that norm (see the module docstring)."""

    def __init__(self, num_codewords: int = 1024, embed_dim: int = 256, usage_momentum: float = 0.99,
                 init_norm: Optional[float] = None):
        super().__init__()
        if num_codewords < 1 or embed_dim < 1:
            raise ValueError(f'num_codewords and embed_dim must be positive, got {num_codewords}, {embed_dim}')
        if not 0.0 <= usage_momentum < 1.0:
            raise ValueError(f'usage_momentum must be in [0, 1), got {usage_momentum}')
        if init_norm is not None and not (isinstance(init_norm, (int, float)) and math.isfinite(init_norm)
                                          and init_norm > 0):
            raise ValueError(f'init_norm must be None (N(0, 1) entries) or a finite number > 0, got {init_norm!r}')
        self.num_codewords = num_codewords
        self.embed_dim = embed_dim
        self.usage_momentum = usage_momentum
        self.init_norm = None if init_norm is None else float(init_norm)
        # Gaussian rows: directions uniform over the sphere (as SwAV's prototypes), norm ~ sqrt(d).
        weight = torch.randn(num_codewords, embed_dim)
        if init_norm is not None:
            weight = F.normalize(weight, dim=1) * float(init_norm)
        self.weight = nn.Parameter(weight)
        self.register_buffer('usage', torch.full((num_codewords,), 1.0 / num_codewords))

    def forward(self) -> torch.Tensor:
        """The L2-normalised codewords, (K, d), in fp32."""
        return l2_normalize(self.weight.float())

    def similarity(self, feats: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``z c_k`` of L2-normalised ``feats`` (N, d) to every codeword: (N, K)."""
        check_features('feats', feats, self.embed_dim)
        return F.normalize(feats.float(), dim=1) @ self().T

    def cost(self, feats: torch.Tensor) -> torch.Tensor:
        """Transport cost ``1 - z c_k`` of (N, d) features to every codeword: (N, K), in [0, 2]."""
        return 1.0 - self.similarity(feats)

    @torch.no_grad()
    def update_usage(self, assignments: torch.Tensor, normalized_rows: bool = False) -> torch.Tensor:
        """Fold the mass per codeword of ``assignments`` (N, K; rows = instances, summed over
        all ranks) into the EMA ``usage``; returns this batch's normalised mass (K,).
        ``normalized_rows``: every row sums to 1 (distributions), so the mass is normalised
        by the joint row count."""
        if assignments.dim() != 2 or assignments.shape[1] != self.num_codewords:
            raise ValueError(f'assignments must have shape (N, {self.num_codewords}), got '
                             f'{tuple(assignments.shape)}')
        mass = dist.all_reduce_sum(assignments.float().sum(0))
        if normalized_rows and not dist.is_distributed():
            mass = mass.mul_(1.0 / max(assignments.shape[0], 1))
        else:
            mass = mass / mass.sum().clamp_min(torch.finfo(torch.float32).tiny)
        self.usage.lerp_(mass, 1.0 - self.usage_momentum)
        return mass

    @staticmethod
    def mass_perplexity(mass: torch.Tensor) -> torch.Tensor:
        """``exp(H(mass))`` of a distribution over codewords (zeros contribute nothing)."""
        return entropy(mass.float() / mass.float().sum()).exp()

    def perplexity(self) -> torch.Tensor:
        """Perplexity of the EMA usage: 1 (collapsed) to K (uniform)."""
        return self.mass_perplexity(self.usage)

    def extra_repr(self) -> str:
        init = 'N(0, 1)' if self.init_norm is None else self.init_norm
        return f'num_codewords={self.num_codewords}, embed_dim={self.embed_dim}, init_norm={init}'
