"""Count the operators a piece of code dispatches (forward and backward), by name.

On a GPU every dispatched operator is a kernel launch (a few microseconds of CPU time each),
so at the batch sizes people train with the losses are bound by how many they launch, not by
arithmetic. :class:`OpCounter` counts them with a ``TorchDispatchMode``: every ``aten`` call
that reaches a kernel, views and in-place ops included, inside and outside autograd's backward
(which runs in the same thread). The tests of the op budgets and
``benchmarks/bench_loss_ops.py`` use it.

Example::

    >>> import torch
    >>> from vlp_codebook.profiling import OpCounter
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> with OpCounter() as ops:
    ...     (x * 2).sum().backward()
    >>> ops.total > 0
    True
"""
from __future__ import annotations

import collections
from typing import Dict

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['OpCounter']


class OpCounter(TorchDispatchMode):
    """Counts dispatched ``aten`` operators by name (``counts``) and in all (``total``)."""

    def __init__(self):
        super().__init__()
        self.counts: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def top(self, n: int = 15):
        """The ``n`` most frequent operators, ``[(name, count), ...]``."""
        return collections.Counter(self.counts).most_common(n)
