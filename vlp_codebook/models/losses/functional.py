r"""Primitives the losses share (one definition of each).

* :func:`soft_cross_entropy` -- :math:`-\frac{1}{N}\sum_i \sum_k y_{ik} \log \mathrm{softmax}(x_i)_k`,
  the cross-entropy against soft targets of the codebook's swapped prediction (targets: OT
  assignments) and of the distillation loss (targets: momentum-distillation mixtures);
* :func:`ramped_alpha` -- ALBEF's linear warm-up of the distillation weight α;
* :func:`l2_normalize` -- ``F.normalize(x, dim=1)`` with a hand-written backward (5 kernels
  instead of autograd's ~12 through the norm, its clamp and the division).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ['soft_cross_entropy', 'ramped_alpha', 'l2_normalize']


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the N rows of ``-sum_k target_k log softmax(logits)_k`` for (N, C) ``logits`` and
    non-negative ``target``; 0 (still attached to ``logits``) when N = 0, so a rank with an empty
    batch contributes nothing rather than NaN."""
    if logits.shape != target.shape or logits.dim() != 2:
        raise ValueError(f'logits and target must both be (N, C), got {tuple(logits.shape)} and '
                         f'{tuple(target.shape)}')
    per_row = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    return per_row.sum() / max(per_row.shape[0], 1)


def ramped_alpha(alpha: float, step: int, warmup_steps: int, epoch: int = 0) -> float:
    """ALBEF's distillation weight ``alpha * min(1, (epoch * warmup_steps + step) / warmup_steps)``.

    With ``warmup_steps`` the iterations of one epoch and ``step`` the iteration within it, this
    is ALBEF's ramp over the first epoch (``alpha`` from epoch 1 on); with ``step`` the global
    step, a ramp over any number of steps. ``warmup_steps = 0``: no ramp, ``alpha``.
    """
    if warmup_steps < 0:
        raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}')
    if warmup_steps == 0:
        return float(alpha)
    return float(alpha) * min(1.0, (epoch * warmup_steps + step) / warmup_steps)


class _L2Normalize(torch.autograd.Function):
    """Rows divided by their L2 norm (clamped below at ``eps``, as ``F.normalize``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)
        y = x / norm
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, norm = ctx.saved_tensors
        # d(x / |x|) = (g - y (y . g)) / |x| (the projection off the row's direction).
        return (grad - y * (y * grad).sum(dim=1, keepdim=True)) / norm, None


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=1)`` for 2-D ``x``: same values, same gradient where the norm is
    above ``eps`` (below it the row is treated as having norm ``eps``, as ``F.normalize``
    does in the forward pass), fewer kernels in the backward pass."""
    if not x.requires_grad:
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)
    return _L2Normalize.apply(x, eps)
