r"""Codebook health from the codebook's ``usage`` buffer (the EMA of the codeword mass the
students predict, :meth:`~vlp_codebook.models.codebook.Codebook.update_usage`).

With :math:`u \in \mathbb{R}^K` the usage normalised to sum 1:

* ``usage_perplexity`` :math:`= \exp(-\sum_k u_k \log u_k)`, from 1 (one codeword takes all the
  mass) to K (uniform);
* ``dead_codewords`` :math:`= |\{k : u_k < f / K\}|`, codewords receiving less than a fraction
  ``f`` (default 1 %) of the uniform share. The buffer starts uniform (no codeword dead) and a
  codeword that receives nothing decays by the EMA momentum each iteration (0.99: below 1 % of
  its share after about 460 iterations).

Example::

    >>> import torch
    >>> codebook_health(torch.tensor([0.5, 0.5, 0.0, 0.0]))['codebook/dead_codewords']
    2
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from vlp_codebook.models.codebook import Codebook, entropy

__all__ = ['codebook_health', 'find_codebook', 'DEAD_FRACTION']

DEAD_FRACTION = 0.01


def codebook_health(usage: torch.Tensor, dead_fraction: float = DEAD_FRACTION) -> Dict[str, float]:
    """``codebook/dead_codewords``, ``codebook/usage_perplexity`` and ``codebook/num_codewords``
    of a (K,) non-negative finite usage vector (any scale, positive sum)."""
    if not 0.0 < dead_fraction <= 1.0:
        raise ValueError(f'dead_fraction must be in (0, 1], got {dead_fraction}')
    usage = torch.as_tensor(usage).detach().float().cpu()
    if usage.dim() != 1 or usage.numel() == 0 or not torch.isfinite(usage).all() or (usage < 0).any() \
            or usage.sum() <= 0:
        raise ValueError(f'usage must be a non-empty 1-D vector of finite non-negative values with a positive '
                         f'sum, got shape {tuple(usage.shape)}')
    num_codewords = usage.numel()
    mass = usage / usage.sum()
    return {'codebook/dead_codewords': int((mass < dead_fraction / num_codewords).sum()),
            'codebook/usage_perplexity': float(entropy(mass).exp()),
            'codebook/num_codewords': num_codewords}


def find_codebook(model: torch.nn.Module) -> Optional[Codebook]:
    """The first :class:`Codebook` among ``model``'s modules (None when it has none)."""
    return next((module for module in model.modules() if isinstance(module, Codebook)), None)
