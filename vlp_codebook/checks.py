r"""Value checks that stay off the hot path: one host read per step instead of one per check.

A check of a tensor's *values* (NaN/inf, a range) needs the device's answer on the host, and on
a GPU every such read waits for the stream to drain. Shape and dtype checks are free and stay
where they are; value checks go through :func:`check`:

* outside :func:`deferred_checks` (a loss called on its own, a test) the answer is read at once
  and a failed check raises immediately, as a plain ``if`` would;
* inside ``with deferred_checks():`` (CODIS wraps its whole loss computation in one) a check
  only records a device flag; on leaving the block the flags are stacked and read **once**, and
  the first failed check raises its own error -- the same message, a few kernels later.

``VLP_CODEBOOK_EAGER_CHECKS=1`` (or :func:`set_eager` ``(True)``) makes every check read at
once, inside the block too: for debugging, when the error should point at the exact line.

Inside ``torch.compile`` (``torch.compiler.is_compiling()``) value checks are skipped, so that
the losses compile to one graph (``fullgraph=True``): run a step eagerly to check the values.

Example::

    >>> import torch
    >>> from vlp_codebook.checks import check_finite, deferred_checks
    >>> x = torch.tensor([1.0, float('nan')])
    >>> with deferred_checks():          # doctest: +SKIP
    ...     check_finite('x', x)          # records a flag, no host read
    ...     y = x * 2                     # the step goes on
    Traceback (most recent call last):
    ValueError: x contains NaN or inf values (1 of 2 entries, shape (2,))
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator, List, Mapping, Optional, Tuple

import torch

__all__ = ['check', 'check_finite', 'check_ids', 'deferred_checks', 'nonfinite_error', 'set_eager']

_state = threading.local()
_eager = os.environ.get('VLP_CODEBOOK_EAGER_CHECKS', '0') not in ('', '0')


def set_eager(eager: bool) -> None:
    """Read every check at once (True) or defer them inside :func:`deferred_checks` (False)."""
    global _eager
    _eager = bool(eager)


def _pending() -> Optional[List[Tuple[torch.Tensor, Callable[[], Exception]]]]:
    return getattr(_state, 'pending', None)


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Collect the checks made inside and read them all with one host read on exit.

    Nested blocks join the outermost one. If the block raises, its own exception propagates
    and the collected flags are dropped.
    """
    if _pending() is not None:
        yield
        return
    _state.pending = pending = []
    try:
        yield
    finally:
        _state.pending = None
    _raise_failed(pending)


def _raise_failed(pending) -> None:
    if not pending:
        return
    device = pending[0][0].device
    oks = torch.stack([ok.reshape(()).to(device, torch.bool) for ok, _ in pending]).tolist()
    for (_, error), ok in zip(pending, oks):
        if not ok:
            raise error()


def check(ok: torch.Tensor, error: Callable[[], Exception]) -> None:
    """Require the boolean device scalar ``ok``; ``error()`` builds the exception to raise
    (called only on failure, so it may read the offending tensor to describe it)."""
    if torch.compiler.is_compiling():
        return    # inside a compiled graph no value is read: check a step eagerly
    pending = _pending()
    if pending is None or _eager:
        if not bool(ok):
            raise error()
    else:
        pending.append((ok.detach() if ok.requires_grad else ok, error))


def check_finite(name: str, tensor: torch.Tensor, hint: str = '') -> None:
    """Require every entry of ``tensor`` to be finite; the error names ``name``."""
    check(torch.isfinite(tensor).all(), lambda: nonfinite_error({name: tensor}, hint=hint))


def nonfinite_error(inputs: Mapping[str, torch.Tensor], fallback: Optional[Exception] = None,
                    hint: str = '') -> Exception:
    """The error of a failed finiteness check over several tensors (a loss checks one fused
    flag, ``isfinite(values).all()``): a ``ValueError`` naming the first of ``inputs`` that
    holds NaN or inf, else ``fallback`` (e.g. the loss's own parameters are at fault)."""
    for name, tensor in inputs.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            return ValueError(f'{name} contains NaN or inf values ({bad} of {tensor.numel()} entries, '
                              f'shape {tuple(tensor.shape)}){hint}')
    return fallback or ValueError('a value is NaN or inf although every input is finite')


def check_ids(name: str, ids, length: int) -> torch.Tensor:
    """``ids`` must be an integer tensor of shape ``(length,)`` (no value is read); returns it."""
    if not isinstance(ids, torch.Tensor) or ids.shape != (length,) or ids.is_floating_point() \
            or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f'{name} must be an integer tensor of shape ({length},), got '
                         f'{getattr(ids, "dtype", type(ids).__name__)} of shape '
                         f'{tuple(getattr(ids, "shape", ()))}')
    return ids
