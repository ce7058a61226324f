r"""A ring buffer of past (teacher) features, the negatives of contrastive losses.

MoCo (He et al., CVPR 2020) and ALBEF (Li et al., NeurIPS 2021) contrast a query against the
current batch of momentum-teacher features *and* a queue :math:`Q` of the teacher features of
earlier batches; CODIS (Duan et al., CVPR 2022) keeps one queue per modality, :math:`Q_v, Q_t`.

Unlike the usual ``register_buffer('queue', randn)``: any size (a batch wraps around; one larger
than the queue keeps its newest ``size`` rows); only filled rows are returned, **oldest first**
(no random initial vectors acting as negatives); optional int64 instance ids (LAVIS's
``idx_queue``); :meth:`enqueue` gathers every rank's batch so all ranks hold the same queue; a
state dict whose ``ptr``/``num_valid`` do not fit is refused; ``ptr`` and ``num_valid`` are
mirrored on the host (:class:`~vlp_codebook.models.host_counters.HostCounters`), so no read waits.

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
from vlp_codebook.checks import check_finite, check_ids
from vlp_codebook.models.host_counters import HostCounters
from vlp_codebook.registry import MODELS

__all__ = ['FeatureQueue']


@MODELS.register_module()
class FeatureQueue(HostCounters, nn.Module):
    """Fixed-capacity FIFO of ``size`` (ALBEF/CODIS: 65536) feature rows of ``dim``, stored in
    ``dtype`` (whatever the autocast dtype); ``with_ids``: one int64 id per row, required by
    :meth:`enqueue`; ``gather``: gather all ranks' batches before enqueuing.

    Buffers: ``feats`` (size, dim); ``ids`` (size,), -1 where unset ((0,) without ids); ``ptr``,
    the row the next entry goes to; ``num_valid``, the filled rows.
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
        self.register_counter('ptr')
        self.register_counter('num_valid')

    def __len__(self) -> int:
        return self.counter('num_valid')

    @property
    def is_full(self) -> bool:
        return len(self) == self.size

    def _order(self) -> torch.Tensor:
        """Storage indices of the valid rows, oldest first."""
        n = len(self)
        start = (self.counter('ptr') - n) % self.size
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
        """Append this rank's (N, dim) ``feats`` and (N,) ``ids`` (iff ``with_ids``), detached,
        replacing the oldest rows once full."""
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f'feats must be a (N, {self.dim}) tensor, got {type(feats).__name__} '
                             f'of shape {tuple(getattr(feats, "shape", ()))}')
        check_finite('feats', feats, hint='; refusing to enqueue them')
        if self.with_ids:
            if ids is None:
                raise ValueError('ids is required: this FeatureQueue was built with with_ids=True')
            check_ids('ids', ids, feats.shape[0])
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
        ptr = self.counter('ptr')
        # The last `keep` rows land where writing all n rows one by one would leave them.
        rows = (torch.arange(keep, device=self.feats.device) + ptr + n - keep) % self.size
        self.feats.index_copy_(0, rows, feats[n - keep:])
        if self.with_ids:
            self.ids.index_copy_(0, rows, ids[n - keep:].to(self.feats.device, torch.long))
        self.set_counter('ptr', (ptr + n) % self.size)
        self.set_counter('num_valid', min(self.size, len(self) + n))

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue."""
        self.feats.zero_()
        self.ids.fill_(-1)
        self.set_counter('ptr', 0)
        self.set_counter('num_valid', 0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checked before anything is copied: a pointer outside the queue would make features()
        # return rows that were never written (or more rows than the queue holds).
        limits = {'ptr': (0, self.size - 1), 'num_valid': (0, self.size)}
        for name, (lo, hi) in limits.items():
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.numel() == 1 \
                    and not lo <= int(value) <= hi:
                raise ValueError(f'state dict key {prefix}{name} = {int(value)} does not fit this '
                                 f'FeatureQueue (size={self.size}): {name} must lie in [{lo}, {hi}]; '
                                 'was the checkpoint written with another queue_size?')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f'size={self.size}, dim={self.dim}, with_ids={self.with_ids}'
