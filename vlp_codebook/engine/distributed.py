"""Distributed set-up for the tools: gloo on CPU, mmengine's own path on GPU.

Why: with ``launcher='pytorch'`` mmengine's ``init_dist`` calls ``torch.cuda.set_device`` before
``init_process_group``, and ``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]``, which torch
rejects for a CPU module. So :func:`setup_launcher`, for ``launcher='pytorch'`` without CUDA,
initialises the gloo process group itself from torchrun's variables (``Runner.setup_env`` then
skips ``init_dist``), keeps ``cfg.launcher`` (distributed samplers, rank-0 logging) and sets
``cfg.model_wrapper_cfg`` to ``MMDistributedDataParallel`` with ``device_ids=None``, keeping the
config's other wrapper options. With CUDA nothing is changed.

Usage (2 CPU processes)::

    torchrun --nproc_per_node 2 -m vlp_codebook.tools.train CONFIG --launcher pytorch
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Dict, MutableMapping, Optional

import torch
import torch.distributed as torch_dist

__all__ = ['TORCHRUN_ENV_VARS', 'init_cpu_process_group', 'cpu_model_wrapper_cfg', 'setup_launcher']

#: the environment variables torchrun exports and ``init_method='env://'`` reads
TORCHRUN_ENV_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')

LAUNCHERS = ('none', 'pytorch')


def init_cpu_process_group(backend: str = 'gloo', timeout_s: Optional[float] = 1800.0) -> None:
    """Initialise the default process group from torchrun's environment (no-op if one exists);
    ``timeout_s=None``: torch's default. A missing or non-integer torchrun variable raises
    ``RuntimeError`` listing them and showing the torchrun command."""
    if torch_dist.is_initialized():
        return
    missing = [name for name in TORCHRUN_ENV_VARS if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f'--launcher pytorch needs the environment variables {", ".join(TORCHRUN_ENV_VARS)} '
            f'(missing: {", ".join(missing)}); start the tool with torchrun, e.g. '
            '`torchrun --nproc_per_node 2 -m vlp_codebook.tools.train CONFIG --launcher pytorch`')
    ranks = {}
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        try:
            ranks[name] = int(os.environ[name])
        except ValueError:
            raise RuntimeError(f'environment variable {name}={os.environ[name]!r} is not an integer') from None
    kwargs: Dict[str, Any] = {}
    if timeout_s is not None:
        kwargs['timeout'] = timedelta(seconds=timeout_s)
    torch_dist.init_process_group(backend=backend, init_method='env://', rank=ranks['RANK'],
                                  world_size=ranks['WORLD_SIZE'], **kwargs)


def cpu_model_wrapper_cfg(model_wrapper_cfg: Optional[MutableMapping] = None) -> Dict[str, Any]:
    """The config's model wrapper (default ``MMDistributedDataParallel``) with ``device_ids=None``.

    ``device_ids=None`` is what torch's ``DistributedDataParallel`` requires for a CPU module;
    mmengine would otherwise pass ``[LOCAL_RANK]``. Other wrapper options are kept.
    """
    from mmengine.registry import MODEL_WRAPPERS
    from torch.nn.parallel import DistributedDataParallel

    wrapper = dict(model_wrapper_cfg or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper.setdefault('broadcast_buffers', False)
    wrapper_type = wrapper['type']
    if isinstance(wrapper_type, str):
        wrapper_type = MODEL_WRAPPERS.get(wrapper_type)
    if isinstance(wrapper_type, type) and issubclass(wrapper_type, DistributedDataParallel):
        wrapper['device_ids'] = None
        wrapper.pop('output_device', None)
    return wrapper


def setup_launcher(cfg: MutableMapping, launcher: str) -> None:
    """Prepare ``cfg`` (its ``launcher``, ``env_cfg.dist_cfg`` and ``model_wrapper_cfg``, in place)
    and the process group for ``launcher``: ``'none'`` (one process) or ``'pytorch'`` (torchrun)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f'launcher={launcher!r} is not supported; use one of {LAUNCHERS}')
    cfg['launcher'] = launcher
    if launcher == 'none' or torch.cuda.is_available():
        return
    env_cfg = cfg.get('env_cfg') or {}
    dist_cfg = dict(env_cfg.get('dist_cfg') or {})
    if dist_cfg.get('backend', 'gloo') != 'gloo':
        # nccl (the usual GPU default in configs) cannot run without CUDA
        dist_cfg['backend'] = 'gloo'
    dist_cfg.setdefault('backend', 'gloo')
    timeout = dist_cfg.get('timeout', 1800)
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    init_cpu_process_group(backend=dist_cfg['backend'], timeout_s=timeout)
    env_cfg = dict(env_cfg)
    env_cfg['dist_cfg'] = dist_cfg
    cfg['env_cfg'] = env_cfg
    cfg['model_wrapper_cfg'] = cpu_model_wrapper_cfg(cfg.get('model_wrapper_cfg'))
