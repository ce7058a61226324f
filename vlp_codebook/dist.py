"""Every cross-rank communication of vlp_codebook goes through this module.

Without a process group the functions return their input, so components call them
unconditionally. Convention: each rank's loss is the mean over its *local* queries times
:func:`batch_weight` (``B_r * world / B``, exactly 1 when the local batches are equal), so the
gradients that DDP averages over ranks equal the gradients of the loss on the joint batch, and
the plain mean over ranks of the per-rank losses equals the joint-batch loss, whatever the
local batch sizes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Mapping, Optional

import torch
import torch.distributed as torch_dist

__all__ = ['is_distributed', 'get_world_size', 'get_rank', 'all_reduce_sum', 'all_reduce_max', 'gather_no_grad',
           'batch_weight', 'gather_with_grad', 'batch_sizes', 'local_slice', 'joint_batch_mean', 'even_shard',
           'communication_device']


def is_distributed(group: Optional[object] = None) -> bool:
    """True when a process group with more than one rank is initialised."""
    return (torch_dist.is_available() and torch_dist.is_initialized()
            and torch_dist.get_world_size(group) > 1)


def get_world_size(group: Optional[object] = None) -> int:
    return torch_dist.get_world_size(group) if is_distributed(group) else 1


def get_rank(group: Optional[object] = None) -> int:
    return torch_dist.get_rank(group) if is_distributed(group) else 0


def all_reduce_sum(tensor: torch.Tensor, group: Optional[object] = None) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is left untouched)."""
    return _all_reduce(tensor, 'SUM', group)


def all_reduce_max(tensor: torch.Tensor, group: Optional[object] = None) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over ranks (a new tensor)."""
    return _all_reduce(tensor, 'MAX', group)


@torch.no_grad()
def _all_reduce(tensor: torch.Tensor, op: str, group: Optional[object]) -> torch.Tensor:
    if not is_distributed(group):
        return tensor
    out = tensor.detach().clone()
    torch_dist.all_reduce(out, op=getattr(torch_dist.ReduceOp, op), group=group)
    return out


@torch.no_grad()
def batch_weight(local_batch_size, device=None, group: Optional[object] = None):
    r"""The factor :math:`B_r W / B` by which a loss scales its mean over this rank's ``B_r``
    rows (or tokens), so that DDP's *average* of the ranks' gradients is the gradient of the
    joint batch's mean, :math:`\sum_r (B_r / B)\,\nabla L_r`, also when the ranks' batch sizes
    differ (the last batch of an epoch, samplers that do not pad). ``local_batch_size`` may be a
    device scalar (a count of masked tokens), never read on the host. ``1.0`` without a process
    group, else a 0-d fp32 tensor after one ``all_reduce``.
    """
    if not is_distributed(group):
        return 1.0
    if torch_dist.get_backend(group) == 'nccl' or device is None:
        device = communication_device(group)
    if isinstance(local_batch_size, torch.Tensor):
        local = local_batch_size.detach().to(device=device, dtype=torch.float32).reshape(())
    else:
        local = torch.tensor(float(local_batch_size), dtype=torch.float32, device=device)
    total = local.clone()
    torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM, group=group)
    return local * get_world_size(group) / total.clamp_min(1.0)


@torch.no_grad()
def joint_batch_mean(values: Mapping[str, torch.Tensor], local_batch_size: int,
                     group: Optional[object] = None) -> 'OrderedDict[str, torch.Tensor]':
    r"""Joint-batch means :math:`\sum_r B_r\,x_r / \sum_r B_r` of per-rank scalar means, for
    logging: detached 0-d fp32 tensors (the input itself when not distributed). All names travel in
    one ``all_reduce``; every rank must pass the same names in the same order.

    Usage: ``joint_batch_mean({'loss': loss.detach()}, local_batch_size=images.shape[0])``.
    """
    if local_batch_size <= 0:
        raise ValueError(f'local_batch_size must be > 0, got {local_batch_size}')
    names = list(values)
    for name in names:
        if values[name].numel() != 1:
            raise ValueError(f'joint_batch_mean: values[{name!r}] must be a scalar, got shape '
                             f'{tuple(values[name].shape)}')
    if not is_distributed(group):
        return OrderedDict(values)
    device = next(iter(values.values())).device if names else torch.device('cpu')
    packed = torch.stack([values[n].detach().float().reshape(()) for n in names]
                         + [torch.zeros((), device=device)])
    packed[:-1] *= local_batch_size
    packed[-1] = local_batch_size
    torch_dist.all_reduce(packed, op=torch_dist.ReduceOp.SUM, group=group)
    means = packed[:-1] / packed[-1]
    return OrderedDict((name, means[i]) for i, name in enumerate(names))


@torch.no_grad()
def batch_sizes(local_size: int, device: torch.device, group: Optional[object] = None) -> List[int]:
    """The leading-dimension size of every rank, in rank order."""
    if not is_distributed(group):
        return [int(local_size)]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(get_world_size(group))]
    torch_dist.all_gather(sizes, torch.tensor([local_size], dtype=torch.long, device=device),
                          group=group)
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: List[int], group: Optional[object]) -> List[torch.Tensor]:
    """all_gather of tensors whose first dimensions differ across ranks (padded, then cut)."""
    max_size = max(sizes)
    padded = tensor.new_zeros((max_size,) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    chunks = [torch.empty_like(padded) for _ in sizes]
    torch_dist.all_gather(chunks, padded.contiguous(), group=group)
    return [chunk[:size] for chunk, size in zip(chunks, sizes)]


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor, group: Optional[object] = None) -> torch.Tensor:
    """``tensor`` (N_r, ...) of every rank, detached, concatenated: (sum_r N_r, ...), rank 0 first."""
    tensor = tensor.detach()
    if not is_distributed(group):
        return tensor
    sizes = batch_sizes(tensor.shape[0], tensor.device, group)
    return torch.cat(_gather_padded(tensor, sizes, group), dim=0)


class _GatherWithGrad(torch.autograd.Function):

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Optional[object]) -> torch.Tensor:
        sizes = batch_sizes(tensor.shape[0], tensor.device, group)
        ctx.group = group
        ctx.sizes = sizes
        ctx.rank = get_rank(group)
        return torch.cat(_gather_padded(tensor.detach(), sizes, group), dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_with_grad(tensor: torch.Tensor, group: Optional[object] = None) -> torch.Tensor:
    """:func:`gather_no_grad` keeping the gradient: rank r's input gets the sum over ranks of the
    gradients of their losses with respect to its rows (as ``torch.distributed.nn.all_gather``)."""
    if not is_distributed(group):
        return tensor
    return _GatherWithGrad.apply(tensor, group)


def local_slice(num_local: int, group: Optional[object] = None, device=None) -> slice:
    """The rows of a gathered tensor (see :func:`gather_no_grad`) that belong to this rank."""
    if not is_distributed(group):
        return slice(0, num_local)
    sizes = batch_sizes(num_local, device or torch.device('cpu'), group)
    start = sum(sizes[:get_rank(group)])
    return slice(start, start + num_local)


def even_shard(total: int, group: Optional[object] = None) -> slice:
    """Rank r's contiguous share ``[r * total // W, (r + 1) * total // W)`` of ``total`` items
    (possibly empty); concatenated in rank order (:func:`gather_no_grad`) they are all in order."""
    if total < 0:
        raise ValueError(f'total must be >= 0, got {total}')
    world, rank = get_world_size(group), get_rank(group)
    return slice(rank * total // world, (rank + 1) * total // world)


def communication_device(group: Optional[object] = None) -> torch.device:
    """Where tensors must live for a collective: the current CUDA device under nccl, else CPU."""
    if is_distributed(group) and torch_dist.get_backend(group) == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')
