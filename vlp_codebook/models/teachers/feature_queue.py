r"""A ring buffer of past (teacher) features, the negatives of contrastive losses.

MoCo (He et al., CVPR 2020) and ALBEF (Li et al., NeurIPS 2021) contrast a query against the
current batch of momentum-teacher features *and* a queue :math:`Q` of the teacher features of
earlier batches; CODIS (Duan et al., CVPR 2022) keeps one queue per modality, :math:`Q_v, Q_t`.

How this queue differs from the usual ``register_buffer('queue', randn)`` implementation:

* **Any size.** No "queue size must be divisible by the batch size" assert: a batch that runs
  past the end wraps around, and a batch larger than the queue keeps its newest ``size`` rows.
* **Only real entries.** Rows that were never written do not exist for the caller:
  :meth:`features` / :meth:`get_ids` return the ``num_valid`` filled rows only (no random
  initial vectors acting as negatives).
* **Order.** :meth:`features` returns the valid rows **oldest first, newest last**, i.e. in
  enqueue order (the storage order rotated so that it starts at the oldest row).
* **Instance ids** (optional, int64): several captions of one image share an id, so a loss can
  count every queued entry with the query's id as a positive (LAVIS's retrieval ``idx_queue``).
* **DDP.** :meth:`enqueue` gathers the batch of every rank (rank 0's rows first, through
  :func:`vlp_codebook.dist.gather_no_grad`; local batch sizes may differ), so all ranks hold the
  same queue -- the queue of one process that saw the joint batch.
* **Checkpointed.** ``feats``, ``ids``, ``ptr`` and ``num_valid`` are buffers.

Use the queue's content *before* enqueuing the current batch (the current teacher batch is
passed to the loss separately), then enqueue::

    >>> import torch
    >>> from vlp_codebook.registry import MODELS
    >>> queue = MODELS.build(dict(type='FeatureQueue', size=5, dim=3, with_ids=True))
    >>> queue.enqueue(torch.randn(4, 3), ids=torch.arange(4))
    >>> queue.enqueue(torch.randn(4, 3), ids=torch.arange(4, 8))
    >>> len(queue), queue.get_ids().tolist()       # the 5 newest entries, oldest first
    (5, [3, 4, 5, 6, 7])
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from vlp_codebook import dist
from vlp_codebook.registry import MODELS

__all__ = ['FeatureQueue']


@MODELS.register_module()
class FeatureQueue(nn.Module):
    """Fixed-capacity FIFO of (dim,) feature rows, with optional int64 instance ids.

    Args:
        size: capacity (number of rows), >= 1. ALBEF/CODIS: 65536.
        dim: feature dimension.
        with_ids: also keep one int64 instance id per row (required in :meth:`enqueue`).
        dtype: storage dtype of the features (default fp32, whatever the autocast dtype).
        gather: gather the batch from all ranks before enqueuing (default True; no effect
            without a process group).

    Buffers:
        feats: (size, dim) storage. ids: (size,) int64, -1 where unset (or (0,) without ids).
        ptr: int64 scalar, the row the next entry goes to. num_valid: int64 scalar, filled rows.
    """

    def __init__(self, size: int, dim: int, with_ids: bool = False, dtype: torch.dtype = torch.float32,
                 gather: bool = True):
        super().__init__()
        if int(size) < 1 or int(dim) < 1:
            raise ValueError(f'size and dim must be >= 1, got size={size}, dim={dim}')
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if not dtype.is_floating_point:
            raise ValueError(f'dtype must be a floating dtype, got {dtype}')
        self.size = int(size)
        self.dim = int(dim)
        self.with_ids = bool(with_ids)
        self.gather = bool(gather)
        self.register_buffer('feats', torch.zeros(self.size, self.dim, dtype=dtype))
        self.register_buffer('ids', torch.full((self.size if with_ids else 0,), -1, dtype=torch.long))
        self.register_buffer('ptr', torch.zeros((), dtype=torch.long))
        self.register_buffer('num_valid', torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.num_valid.item())

    @property
    def is_full(self) -> bool:
        return len(self) == self.size

    def _order(self) -> torch.Tensor:
        """Storage indices of the valid rows, oldest first."""
        n = len(self)
        start = (int(self.ptr.item()) - n) % self.size
        return (torch.arange(n, device=self.feats.device) + start) % self.size

    def features(self) -> torch.Tensor:
        """The valid rows (num_valid, dim), oldest first; a copy, safe to keep across enqueues."""
        return self.feats.index_select(0, self._order())

    def get_ids(self) -> torch.Tensor:
        """The ids (num_valid,) of :meth:`features`' rows, oldest first (needs ``with_ids``)."""
        if not self.with_ids:
            raise RuntimeError('this FeatureQueue was built with with_ids=False')
        return self.ids.index_select(0, self._order())

    def get(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(features, ids)``; ids is None without ``with_ids``."""
        return self.features(), (self.get_ids() if self.with_ids else None)

    @torch.no_grad()
    def enqueue(self, feats: torch.Tensor, ids: Optional[torch.Tensor] = None) -> None:
        """Append a batch (replacing the oldest rows once full).

        Args:
            feats: (N, dim) features of this rank (detached; gathered from all ranks first).
            ids: (N,) integer instance ids, required iff ``with_ids``.
        """
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f'feats must be a (N, {self.dim}) tensor, got {type(feats).__name__} '
                             f'of shape {tuple(getattr(feats, "shape", ()))}')
        if not torch.isfinite(feats).all():
            raise ValueError(f'feats contains NaN or inf values (shape {tuple(feats.shape)}); '
                             'refusing to enqueue them')
        if self.with_ids:
            if ids is None:
                raise ValueError('ids is required: this FeatureQueue was built with with_ids=True')
            if not isinstance(ids, torch.Tensor) or ids.shape != (feats.shape[0],) \
                    or ids.is_floating_point() or ids.is_complex():
                raise ValueError(f'ids must be an integer tensor of shape ({feats.shape[0]},), got '
                                 f'{getattr(ids, "dtype", type(ids).__name__)} of shape '
                                 f'{tuple(getattr(ids, "shape", ()))}')
        elif ids is not None:
            raise ValueError('ids given, but this FeatureQueue was built with with_ids=False')
        feats = feats.detach().to(device=self.feats.device, dtype=self.feats.dtype)
        if self.gather:
            feats = dist.gather_no_grad(feats)
            if self.with_ids:
                ids = dist.gather_no_grad(ids.to(device=self.feats.device, dtype=torch.long))
        n = feats.shape[0]
        if n == 0:
            return
        keep = min(n, self.size)
        ptr = int(self.ptr.item())
        # The last `keep` rows land where writing all n rows one by one would leave them.
        rows = (torch.arange(keep, device=self.feats.device) + ptr + n - keep) % self.size
        self.feats.index_copy_(0, rows, feats[n - keep:])
        if self.with_ids:
            self.ids.index_copy_(0, rows, ids[n - keep:].to(self.feats.device, torch.long))
        self.ptr.fill_((ptr + n) % self.size)
        self.num_valid.fill_(min(self.size, len(self) + n))

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue."""
        self.feats.zero_()
        self.ids.fill_(-1)
        self.ptr.zero_()
        self.num_valid.zero_()

    def extra_repr(self) -> str:
        return f'size={self.size}, dim={self.dim}, with_ids={self.with_ids}'
