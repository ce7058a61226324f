"""bfloat16 autocast for ``--amp`` on machines without CUDA.

Why: mmengine's ``AmpOptimWrapper`` asserts that CUDA (or NPU/MLU/MUSA) is available, so
``--amp`` would fail on CPU. ``torch.autocast('cpu')`` supports bfloat16 only; bfloat16 has
float32's exponent range, so no loss scaling is needed and this wrapper is a plain
:class:`~mmengine.optim.OptimWrapper` whose ``optim_context`` also enters autocast. Parameters,
gradients and optimizer state stay float32. Components keep their softmax statistics in fp32
themselves (project rule), so only the matmuls run in bfloat16.

Usage (what ``vlp_codebook.tools.train --amp`` writes when CUDA is missing)::

    optim_wrapper = dict(type='BF16AutocastOptimWrapper', optimizer=dict(type='AdamW', lr=1e-4))
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from mmengine.device import get_device
from mmengine.optim import OptimWrapper

from vlp_codebook.registry import OPTIM_WRAPPERS

__all__ = ['BF16AutocastOptimWrapper']


@OPTIM_WRAPPERS.register_module()
class BF16AutocastOptimWrapper(OptimWrapper):
    """:class:`~mmengine.optim.OptimWrapper` that runs the forward pass under bfloat16 autocast on
    ``device_type`` (``None``: mmengine's current device)."""

    def __init__(self, device_type: str = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.device_type = device_type or get_device()

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        with super().optim_context(model), torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            yield
