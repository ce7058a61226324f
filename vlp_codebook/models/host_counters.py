"""Integer counters kept as buffers (checkpointed) *and* as Python ints (read for free).

A queue's write pointer, a teacher's update count or a model's step count decide Python-side
control flow every step. Kept only as device buffers, each use is ``.item()``: a host read that
waits for the GPU. :class:`HostCounters` keeps a Python mirror that every update writes
together with the buffer (``fill_``, no read); the buffer is what ``state_dict`` saves, and the
mirror is refreshed from the state dict when one is loaded (the only read, at load time).

Usage::

    class Queue(HostCounters, nn.Module):
        def __init__(self):
            super().__init__()
            self.register_counter('ptr')
        def step(self):
            self.set_counter('ptr', self.counter('ptr') + 1)
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ['HostCounters']


class HostCounters:
    """Mixin for ``nn.Module`` subclasses (put it first in the bases)."""

    def register_counter(self, name: str, value: int = 0) -> None:
        """An int64 scalar buffer ``name`` with a Python mirror."""
        self.register_buffer(name, torch.tensor(int(value), dtype=torch.long))
        if '_host_counters' not in self.__dict__:
            self._host_counters: Dict[str, int] = {}
        self._host_counters[name] = int(value)

    def counter(self, name: str) -> int:
        """The counter's value, without touching the device."""
        return self._host_counters[name]

    def set_counter(self, name: str, value: int) -> None:
        """Write the mirror and the buffer (``fill_`` with a Python int: no host read)."""
        self._host_counters[name] = int(value)
        getattr(self, name).fill_(int(value))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in self.__dict__.get('_host_counters', {}):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                self._host_counters[name] = int(value)
