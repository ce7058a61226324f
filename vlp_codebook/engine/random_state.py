"""Save the random number generators' state in checkpoints, so a resumed run continues exactly.

Why: mmengine checkpoints hold the model, optimizer, schedulers, message hub and the seed,
but not the state of Python's ``random``, numpy's and torch's generators. A resumed run
re-seeds, so everything random after the resume point (dropout, MLM masking, ITM negative
sampling) draws different numbers than the uninterrupted run would have: the next losses
differ. :class:`RandomStateHook` fixes that:

* ``before_save_checkpoint``: stores every rank's generator states in ``checkpoint['rng_state']``
  (a list indexed by rank; gathered through :mod:`vlp_codebook.dist`, as pickled bytes);
* ``after_load_checkpoint`` (only when the runner *resumes*, not for ``load_from`` fine-tuning):
  keeps this rank's entry; ``before_train`` (after the Runner built the data loaders and
  loaded the checkpoint) puts it back into the generators;
* validation is made neutral to the training randomness: the state is taken in
  ``before_val`` and put back in ``after_val``, because a resumed run does not repeat the
  validation that the uninterrupted run did at the checkpoint's iteration (building the
  validation data loader iterator alone draws from torch's generator). A checkpoint saved during
  validation (best-metric checkpoints) stores the state from before the validation.

Limit: the states are restored before training resumes, but mmengine's iteration-based loop
then re-reads (skips) the already-trained batches; data transforms that draw from the
main process's generators while being skipped (``num_workers=0`` and random transforms) would
still shift the stream. Random transforms inside data-loader workers are fine (mmengine seeds
each worker), and so is randomness inside the model.

The train tool (:mod:`vlp_codebook.tools.train`) adds this hook to every config that does not
list it. In a config::

    custom_hooks = [dict(type='RandomStateHook')]
"""
from __future__ import annotations

import pickle
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from mmengine.hooks import Hook

from vlp_codebook import dist as vlp_dist
from vlp_codebook.registry import HOOKS

__all__ = ['RandomStateHook', 'get_random_state', 'set_random_state']

CHECKPOINT_KEY = 'rng_state'


def get_random_state() -> Dict[str, Any]:
    """The state of Python's, numpy's and torch's (CPU and every CUDA device's) generators."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: Dict[str, Any]) -> None:
    """Put a :func:`get_random_state` result back into the generators."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _gather_states(state: Dict[str, Any]) -> List[bytes]:
    """Every rank's pickled state, in rank order (one process: a one-element list)."""
    payload = torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)
    if not vlp_dist.is_distributed():
        return [payload.numpy().tobytes()]
    from mmengine.dist import get_comm_device
    device = get_comm_device()
    sizes = vlp_dist.batch_sizes(payload.numel(), device)
    gathered = vlp_dist.gather_no_grad(payload.to(device)).cpu()
    out, start = [], 0
    for size in sizes:
        out.append(gathered[start:start + size].numpy().tobytes())
        start += size
    return out


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Checkpoint and restore the generators' state for exact resumption (see module doc)."""

    priority = 'NORMAL'

    def __init__(self) -> None:
        self._pending: Optional[Dict[str, Any]] = None
        self._before_val: Optional[Dict[str, Any]] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = self._before_val if self._before_val is not None else get_random_state()
        checkpoint[CHECKPOINT_KEY] = _gather_states(state)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False) or CHECKPOINT_KEY not in checkpoint:
            return
        states = checkpoint[CHECKPOINT_KEY]
        world_size, rank = vlp_dist.get_world_size(), vlp_dist.get_rank()
        if len(states) != world_size:
            runner.logger.warning(
                f'RandomStateHook: the checkpoint holds the random state of {len(states)} process(es), '
                f'this run has {world_size}; the generators are not restored (the run continues '
                'correctly, but its random draws differ from an uninterrupted run)')
            return
        self._pending = pickle.loads(states[rank])

    def before_train(self, runner) -> None:
        if self._pending is not None:
            set_random_state(self._pending)
            self._pending = None

    def before_val(self, runner) -> None:
        self._before_val = get_random_state()

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            set_random_state(self._before_val)
            self._before_val = None
