"""Helpers to run a test body in several CPU processes over gloo (no GPU, no launcher).

Workers are *forked* where the platform allows it: they inherit the imported modules, so they
start in well under a second (spawned workers re-import torch, transformers and vlp_codebook,
about 15 s on the 2-core CI machine). Forking is safe here because the test process runs torch
with one intra-op thread (``tests/conftest.py``) and has no process group of its own.

``run_workers(fn, world_size, *args)`` spawns ``world_size`` processes that call
``fn(rank, world_size, port, *args)``; ``fn`` must be a module-level function (it is pickled).
A worker calls :func:`init_gloo` first. Results travel back through files the workers write
(e.g. ``torch.save`` into a temporary directory given in ``args``). An exception in a worker
fails the caller; a hang is killed after ``timeout`` seconds.
"""
from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free on localhost a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Join a gloo process group on localhost (one thread per process: the CI box is small)."""
    os.environ.setdefault('GLOO_SOCKET_IFNAME', 'lo')
    torch.set_num_threads(1)
    torch_dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                                  world_size=world_size, timeout=datetime.timedelta(seconds=60))


def _entry(rank, fn, world_size, port, args):
    try:
        fn(rank, world_size, port, *args)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` processes and wait."""
    port = free_port()
    start_method = 'fork' if 'fork' in mp.get_all_start_methods() else 'spawn'
    context = mp.start_processes(_entry, args=(fn, world_size, port, args), nprocs=world_size,
                                 join=False, start_method=start_method)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f'distributed workers did not finish within {timeout} s')
