"""Safeguarded Anderson acceleration of a fixed-point iteration, on the device.

:func:`vlp_codebook.ot.sinkhorn` mixes the column update of ``log v`` with it once plain
Sinkhorn iterations have not converged after a few dozen: in the codebook loss's range plain
iterations stall on clustered features when the batch is as large as the codebook or larger
(``docs/ot_and_codebook.md``).
"""
from __future__ import annotations

import math

import torch

__all__ = ['AndersonMixer', 'RIDGE']

# Tikhonov weight of the Gram system, relative to its trace: Sinkhorn residuals become exactly
# linearly dependent near convergence.
RIDGE = 1e-10


class AndersonMixer:
    r"""Safeguarded Anderson acceleration (type II) of a fixed-point iteration :math:`x \mapsto G(x)`.

    Keeps the last ``depth + 1`` images :math:`G(x_k)` and residuals :math:`r_k = G(x_k) - x_k`
    and proposes :math:`\sum_k \alpha_k G(x_k)` with :math:`\alpha = \arg\min \|\sum_k
    \alpha_k r_k\|_2` subject to :math:`\sum_k \alpha_k = 1` (Walker & Ni, "Anderson
    acceleration for fixed-point iterations", SINUM 2011). Residuals are centred first: the
    Sinkhorn column map is blind to a constant added to ``log v``.

    Safeguard: an iterate whose error is larger than that of the last accepted one is
    rejected, and the plain step :math:`G(x)` from the last accepted iterate is taken instead
    (and accepted whatever its error), so a bad extrapolation costs one iteration and the
    method never does much worse than plain Sinkhorn. ``depth = 0`` is plain Sinkhorn.

    Every step is the same sequence of tensor operations: the history is a ring of
    ``depth + 1`` slots with a 0/1 mask of the slots in use, the least-squares system is solved
    over all slots (unused ones decoupled by an identity row), and the safeguard's choices are
    ``torch.where``s on device scalars; nothing is read back to the host.
    """

    def __init__(self, depth: int):
        self.depth = depth
        self.count = 0      # steps taken: the slot written next is count % (depth + 1)
        self.images = None  # (depth+1, n) G(x_k); residuals likewise; gram (depth+1, depth+1)

    def reset(self) -> None:
        """Forget everything (after the kernel was rebuilt, old iterates mean nothing)."""
        self.images = None
        self.count = 0

    def step(self, x: torch.Tensor, gx: torch.Tensor, error) -> torch.Tensor:
        """Next iterate, given the current one ``x``, its image ``gx`` and its error (a
        number or a device scalar)."""
        if self.depth == 0:
            return gx
        slots = self.depth + 1
        error = torch.as_tensor(error, dtype=torch.float64, device=gx.device)
        if self.images is None:
            self.images = gx.new_zeros((slots, gx.numel()))
            self.residuals = gx.new_zeros((slots, gx.numel()))
            self.gram = gx.new_zeros((slots, slots), dtype=torch.float64)
            self.in_use = gx.new_zeros(slots, dtype=torch.float64)
            self.accepted_error = torch.full((), math.inf, dtype=torch.float64, device=gx.device)
            self.accepted_image = gx
            self.took_plain = torch.zeros((), dtype=torch.bool, device=gx.device)
            self.one_hot = torch.eye(slots, dtype=torch.float64, device=gx.device)
        reject = (error > self.accepted_error) & ~self.took_plain
        slot = self.count % slots
        self.count += 1
        # The new pair goes into its slot whatever happens: a rejection empties the history.
        r = self.residuals[slot]
        torch.sub(gx, x, out=r)
        r.sub_(r.mean())
        self.images[slot] = gx
        # Only the new row of the Gram matrix R R^T is computed; slot order does not matter.
        dots = (self.residuals @ r).double()
        self.gram[slot] = dots
        self.gram[:, slot] = dots
        in_use = torch.maximum(self.in_use, self.one_hot[slot])
        in_use = torch.where(reject, 0.0, in_use)
        gram = self.gram * (in_use[:, None] * in_use[None, :])
        # Tikhonov term relative to the residual scale keeps the tiny system well posed.
        ridge = RIDGE * gram.diagonal().sum() + 1e-300
        system = gram + torch.diag(in_use * ridge + (1.0 - in_use))
        weights = torch.linalg.solve_ex(system, in_use[:, None])[0][:, 0]
        total = weights.sum()
        usable = torch.isfinite(total) & (total != 0)
        mixed = (weights / torch.where(usable, total, 1.0)).to(gx.dtype) @ self.images
        self.in_use = torch.where(usable | reject, in_use, 0.0)
        out = torch.where(reject, self.accepted_image, torch.where(usable, mixed, gx))
        self.accepted_error = torch.where(reject, self.accepted_error, error)
        self.accepted_image = torch.where(reject, self.accepted_image, gx)
        self.took_plain = reject
        return out
