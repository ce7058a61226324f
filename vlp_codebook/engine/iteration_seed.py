"""Reseed the random generators at every training iteration, so a resumed run continues exactly.

Why: mmengine checkpoints hold the model, optimizer, schedulers, message hub and the seed,
but not the state of Python's ``random``, numpy's and torch's generators. A resumed run
re-seeds once, so everything random after the resume point (dropout, MLM masking, ITM
negative sampling) draws different numbers than the uninterrupted run would have, and the
next losses differ.

What: :class:`IterationSeedHook` seeds the generators before every training iteration from
``(runner.seed, rank, iteration)``. The draws of iteration ``i`` then depend only on ``i``, not
on what ran before (validation, a resume, a different number of checkpoints), with no state
to save and no cross-rank communication (saving every rank's generator state would need a
collective inside ``CheckpointHook``, which mmengine runs on rank 0 only). Ranks get
different streams (as ALBEF's ``seed + rank``). ``runner.seed`` is stored in the checkpoint
and restored on resume.

Limit: the iteration's batch is read *before* ``before_train_iter`` runs, and mmengine's
iteration-based loop re-reads (skips) the already-trained batches after a resume; random data
transforms running in the main process (``num_workers=0``) therefore still differ after a resume.
Transforms in data-loader workers are fine (mmengine seeds each worker), and so is randomness
inside the model.

The train tool (:mod:`vlp_codebook.tools.train`) adds this hook to every config that does not
list it. In a config::

    custom_hooks = [dict(type='IterationSeedHook')]
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from mmengine.hooks import Hook

from vlp_codebook import dist as vlp_dist
from vlp_codebook.registry import HOOKS

__all__ = ['IterationSeedHook', 'iteration_seed', 'seed_everything']


def iteration_seed(base_seed: int, rank: int, iteration: int) -> int:
    """A 63-bit seed mixed from the three integers (numpy ``SeedSequence``: no easy collisions)."""
    words = np.random.SeedSequence([int(base_seed) % 2**32, rank, iteration]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@HOOKS.register_module()
class IterationSeedHook(Hook):
    """``seed_everything(iteration_seed(runner.seed, rank, runner.iter))`` before every train iteration.

    Runs first among the ``before_train_iter`` hooks (priority ``VERY_HIGH``).
    """

    priority = 'VERY_HIGH'

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        seed_everything(iteration_seed(runner.seed, vlp_dist.get_rank(), runner.iter))
