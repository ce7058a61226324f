"""The layout of :class:`~vlp_codebook.models.losses.MultiDirectionalDistillationLoss`'s
computation: which (query modality, key modality) cells its directions use, the keys
``[joint teacher batch; queue]`` of each key modality and their instance ids, and the one
product and softmax that serve every cell.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple, Union

import torch
from torch.nn import functional as F

from vlp_codebook import dist
from vlp_codebook.checks import check_ids, nonfinite_error
from vlp_codebook.models.teachers.feature_queue import FeatureQueue

# direction -> (query modality, key modality)
MODALITIES = {'t2i': ('text', 'image'), 'i2t': ('image', 'text'),
              'i2i': ('image', 'image'), 't2t': ('text', 'text')}
QueueType = Union[None, torch.Tensor, FeatureQueue]


_LAYOUT_ORDER = ('image', 'text')
_NO_ID = torch.iinfo(torch.long).min    # key id of a row no query is paired with
_PAD_LOGIT = -1e30                      # logit of a padding key: softmax weight exactly 0


class Grid:
    """Layout of one computation: the (query modality, key modality) *cells* the directions use.

    Queries are the student rows of the query modalities, stacked (Q·B, d). Each key modality's
    keys are ``[joint teacher batch; queue]``, padded to one length N when the two differ
    (padding keys get logit -1e30 and are never positives). Either every query modality meets
    the same key modalities -- one shared ``(C·N, d)`` key matrix, one product, logits viewed
    ``(Q, B, C, N)`` (all four directions; one direction; three, where the unused cell gets
    weight 0) -- or each meets a different single one: a ``(Q, N, d)`` stack and a batched
    product, ``(Q, B, 1, N)`` (the cross or the intra pairs alone). One softmax over the last
    axis serves every cell.
    """

    def __init__(self, directions, batch, device, gamma, inputs, temperature):
        pairs = [MODALITIES[d] for d in directions]
        self.queries = [m for m in _LAYOUT_ORDER if any(q == m for q, _ in pairs)]
        lists = {q: [k for k in _LAYOUT_ORDER if (q, k) in pairs] for q in self.queries}
        self.shared = len({tuple(v) for v in lists.values()}) == 1 or any(len(v) == 2 for v in lists.values())
        if self.shared:
            self.key_mods = [k for k in _LAYOUT_ORDER if any(k == key for _, key in pairs)]
            self.cells = tuple((q, k) for q in self.queries for k in self.key_mods)
        else:
            self.key_mods = [lists[q][0] for q in self.queries]
            self.cells = tuple((q, lists[q][0]) for q in self.queries)
        self.width = len(self.key_mods) if self.shared else 1
        self.batch, self.device, self.gamma = batch, device, gamma
        self.inputs, self.temperature = dict(inputs), temperature
        self.bias: Optional[torch.Tensor] = None

    def keys(self, teacher, queues, image_ids, dim, prep) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised keys, their instance ids (shaped to broadcast against the queries' own
        ids as a column) and the queries' own ids."""
        device, batch = self.device, self.batch
        if image_ids is None:
            local = dist.local_slice(batch, device=device)
            own = torch.arange(local.start, local.stop, device=device)
        else:
            own = check_ids('image_ids', image_ids, batch).to(device=device, dtype=torch.long)
        joint_ids, blocks = None if image_ids is None else dist.gather_no_grad(own), {}
        for m in self.key_mods:
            joint = dist.gather_no_grad(teacher[m]) if dist.is_distributed() else teacher[m]
            feats, ids = queue_rows(*queues[m], f'{m}_queue', dim, device)
            self.inputs[f'{m}_queue'] = feats
            ids = ids if image_ids is not None and ids is not None else _no_ids(feats.shape[0], device)
            batch_ids = torch.arange(joint.shape[0], device=device) if joint_ids is None else joint_ids
            blocks[m] = ([joint.float(), feats.float()], [batch_ids, ids])
        self.lengths = {m: sum(x.shape[0] for x in feats) for m, (feats, _) in blocks.items()}
        self.length = max(self.lengths.values())
        rows, ids = [], []
        for m in self.key_mods:
            pad = self.length - self.lengths[m]
            rows += blocks[m][0] + ([torch.zeros(pad, dim, device=device)] if pad else [])
            ids += blocks[m][1] + ([_no_ids(pad, device)] if pad else [])
        keys, key_ids = prep(torch.cat(rows)), torch.cat(ids)
        if len(set(self.lengths.values())) > 1:
            is_pad = torch.cat([torch.arange(self.length, device=device) >= self.lengths[m] for m in self.key_mods])
            self.bias = (is_pad.float() * _PAD_LOGIT).view((-1,) if self.shared else (len(self.queries), 1, self.length))
        if not self.shared:
            keys, key_ids = keys.view(len(self.queries), self.length, dim), key_ids.view(len(self.queries), 1, -1)
        return keys, key_ids, own

    def product(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.shared:
            return queries @ keys.T
        return torch.bmm(queries.view(len(self.queries), self.batch, -1), keys.transpose(1, 2))

    def _view(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits if self.bias is None else logits + self.bias
        return logits.view(-1, self.batch, self.width, self.length)

    def log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self._view(logits), dim=3)

    def softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._view(logits), dim=3)

    def error(self) -> Exception:
        """The error of a failed finiteness check, naming the first input at fault."""
        name = 'temperature' if self.temperature is not None else 'the loss\'s temperature'
        gamma = self.gamma.detach()
        if bool(torch.isfinite(gamma)) and bool(gamma > 0):
            fallback = ValueError('MultiDirectionalDistillationLoss: a loss is NaN or inf although every '
                                  'input is finite')
        else:
            fallback = ValueError(f'{name} must be a positive finite number, got {gamma.flatten().tolist()}')
        return nonfinite_error(self.inputs, fallback)


def _no_ids(n: int, device) -> torch.Tensor:
    return torch.full((n,), _NO_ID, dtype=torch.long, device=device)




def check_batch(feats: Mapping[str, torch.Tensor], embed_dim: Optional[int]) -> Tuple[int, int]:
    """Check (B, d) floating tensors with one B and one d (values: with the loss); return (d, B)."""
    dims, batches = {}, {}
    for name, value in feats.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            raise ValueError(f'{name} must be a floating 2-D tensor (batch, embed_dim), got '
                             f'{type(value).__name__} of shape {tuple(getattr(value, "shape", ()))}')
        dims[name], batches[name] = value.shape[1], value.shape[0]
    if len(set(dims.values())) > 1 or (embed_dim is not None and set(dims.values()) != {embed_dim}):
        expected = f' (embed_dim={embed_dim})' if embed_dim is not None else ''
        raise ValueError(f'feature dimensions differ{expected}: {dims}')
    if len(set(batches.values())) > 1:
        raise ValueError('student and teacher features must hold the same B pairs, got batch sizes '
                         f'{batches}')
    return next(iter(dims.values())), next(iter(batches.values()))


def queue_rows(queue: QueueType, queue_ids: Optional[torch.Tensor], name: str, dim: int,
                device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The (N, d) valid rows of a queue argument and their ids (or None); a full FeatureQueue's
    storage as it is (the order of the keys does not change the loss)."""
    if queue is None:
        if queue_ids is not None:
            raise ValueError(f'{name}_ids given without {name}')
        return torch.zeros(0, dim, device=device), None
    if isinstance(queue, FeatureQueue):
        if queue_ids is not None:
            raise ValueError(f'{name} is a FeatureQueue, which brings its own ids: do not pass {name}_ids')
        if queue.dim != dim:
            raise ValueError(f'{name} holds features of dimension {queue.dim}, the features have {dim}')
        feats, queue_ids = (queue.feats, queue.ids if queue.with_ids else None) if queue.is_full else queue.get()
    elif isinstance(queue, torch.Tensor):
        feats = queue
        if feats.dim() != 2 or feats.shape[1] != dim or not feats.is_floating_point():
            raise ValueError(f'{name} must be a floating (N, {dim}) tensor, got {feats.dtype} of '
                             f'shape {tuple(feats.shape)}')
        if queue_ids is not None:
            check_ids(f'{name}_ids', queue_ids, feats.shape[0])
    else:
        raise TypeError(f'{name} must be None, a (N, d) tensor or a FeatureQueue, got {type(queue).__name__}')
    feats = (feats.detach() if feats.requires_grad else feats).to(device)
    return feats, (None if queue_ids is None else queue_ids.to(device=device, dtype=torch.long))
