"""LAVIS output classes with the CODIS terms as named fields.

Subclasses of LAVIS's ``AlbefOutput`` / ``BlipOutput`` (so every ``isinstance`` check passes) that
add ``loss_code`` (the sum of the four codebook terms), ``loss_code_i2p, loss_code_t2p,
loss_code_ot_v, loss_code_ot_t`` (:class:`vlp_codebook.models.losses.CodebookOTLoss`'s terms)
and, when enabled, ``loss_i2i, loss_t2t``. ``loss`` is LAVIS's total plus all of them, so LAVIS's
runner trains them unchanged. Disabled terms are ``None``, absent from ``.keys()``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
from lavis.models.albef_models.albef_outputs import AlbefOutput
from lavis.models.blip_models.blip_outputs import BlipOutput

__all__ = ['CodisAlbefOutput', 'CodisBlipOutput', 'CODIS_TERMS', 'with_codis_terms']

CODIS_TERMS = ('loss_code', 'loss_code_i2p', 'loss_code_t2p', 'loss_code_ot_v', 'loss_code_ot_t',
               'loss_i2i', 'loss_t2t')


def _with_terms(base):
    """``base`` plus one optional field per CODIS term, after its own (a dataclass like LAVIS's)."""
    fields = [(name, Optional[torch.FloatTensor], dataclasses.field(default=None)) for name in CODIS_TERMS]
    cls = dataclasses.make_dataclass(f'Codis{base.__name__}', fields, bases=(base,))
    cls.__module__ = __name__     # pickles by name, like a class written here
    return cls


CodisAlbefOutput = _with_terms(AlbefOutput)
CodisBlipOutput = _with_terms(BlipOutput)

_CODIS_CLASS = {AlbefOutput: CodisAlbefOutput, BlipOutput: CodisBlipOutput}


def with_codis_terms(output, terms: Dict[str, torch.Tensor]):
    """A copy of LAVIS's ``output`` as its CODIS subclass, with ``terms`` (keys from
    :data:`CODIS_TERMS`) filled in and added to ``loss``."""
    unknown = sorted(set(terms) - set(CODIS_TERMS))
    if unknown:
        raise KeyError(f'unknown CODIS terms {unknown}; known: {list(CODIS_TERMS)}')
    base = next((b for b in _CODIS_CLASS if isinstance(output, b)), None)
    if base is None:
        raise TypeError(f'expected a LAVIS AlbefOutput or BlipOutput, got {type(output).__name__}')
    values = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    extra = {k: v for k, v in terms.items() if k != 'loss_code'}
    total = sum(extra.values())
    if isinstance(total, torch.Tensor):
        values['loss'] = values['loss'] + total   # type promotion keeps fp32 terms fp32
    values.update(terms)
    return _CODIS_CLASS[base](**values)
