"""Fused CPU loops for :func:`vlp_codebook.ot.sinkhorn`, compiled from C on first use.

``csrc/sinkhorn_cpu.c`` fuses what torch would run as separate passes over the (B, K) kernel:
the row softmax of ``-M/ε`` with the first column sums, each iteration's ``K v`` → ``u`` →
``Kᵀu`` (one pass instead of two) and the final ``diag(u) K diag(v)``; for single-process
solves it also runs the whole iteration loop (error, Anderson mixing, range checks), which
took as long as the passes when done as small torch ops. On the 2-core
machine this project is benchmarked on, that takes a 1024 x 4096 solve from ~10-15 to ~6-8 ms
(``docs/ot_and_codebook.md``).

It is optional by design: the first call compiles the C file with the system C compiler
(``$CC``, else ``cc``; about 0.3 s) into a per-user cache
(``$VLP_CODEBOOK_CACHE``, default ``~/.cache/vlp_codebook``), keyed by a hash of the
source, flags and CPU, and loads it with :mod:`ctypes`. If there is no compiler, the build
fails, or ``VLP_CODEBOOK_NATIVE=0`` is set, :func:`kernels` returns ``None`` (the reason is
logged once) and the solver uses its pure-torch path, which gives the same plan.

The C code uses OpenMP; when torch is imported first (always, here) the loader resolves
``libgomp.so.1`` to torch's own copy, so both share one thread pool and the threads follow
``torch.get_num_threads()``.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

__all__ = ['kernels', 'NativeKernels']

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name('csrc') / 'sinkhorn_cpu.c'
# -march=native: the library is built on the machine that runs it. No -ffast-math: only the
# reassociation needed to vectorise the sums, and no errno/trap semantics for the math.
_FLAGS = ['-O3', '-march=native', '-fno-math-errno', '-fno-trapping-math', '-fassociative-math',
          '-fno-signed-zeros', '-freciprocal-math', '-ffinite-math-only', '-fopenmp', '-fPIC',
          '-shared']
_lock = threading.Lock()
_loaded: Optional['NativeKernels'] = None
_failed_reason: Optional[str] = None


class NativeKernels:
    """ctypes bindings of the three fused passes; tensors must be contiguous CPU fp32."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        ptr, i64, f32, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        self._softmax = lib.vlp_softmax_rows_colsum
        self._softmax.argtypes = [ptr, ptr, ptr, ptr, ctypes.POINTER(i64), i64, i64, f32, cint]
        self._softmax.restype = cint
        self._iteration = lib.vlp_fused_iteration
        self._iteration.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, cint]
        self._iteration.restype = cint
        self._loop = lib.vlp_sinkhorn_loop
        self._loop.argtypes = [ptr] * 7 + [i64, i64, i64, ctypes.c_double, cint, ctypes.c_double,
                                           cint, ctypes.POINTER(i64), ctypes.POINTER(ctypes.c_double)]
        self._loop.restype = cint
        self._scale = lib.vlp_scale_rows_cols
        self._scale.argtypes = [ptr, ptr, ptr, i64, i64, cint]
        self._scale.restype = None

    def softmax_rows_colsum(self, M: torch.Tensor, out: torch.Tensor, a: torch.Tensor,
                            inv_eps: float):
        """``out`` ← row softmax of ``-M * inv_eps``; returns ``outᵀ a`` (K,) and the number
        of NaN/inf entries of ``M`` (counted in the same pass; if any, the rest is garbage)."""
        B, K = M.shape
        col = torch.empty(K, dtype=torch.float32)
        nonfinite = ctypes.c_int64(0)
        if self._softmax(M.data_ptr(), out.data_ptr(), a.data_ptr(), col.data_ptr(),
                         ctypes.byref(nonfinite), B, K, inv_eps, torch.get_num_threads()) != 0:
            raise MemoryError('sinkhorn: could not allocate the per-thread column sums')
        return col, nonfinite.value

    def iteration(self, kernel: torch.Tensor, v: torch.Tensor, a: torch.Tensor):
        """One Sinkhorn iteration: returns ``u = a / (K v)`` (0 where a = 0), ``K v``, ``Kᵀ u``."""
        B, K = kernel.shape
        u, Kv, col = torch.empty(B), torch.empty(B), torch.empty(K)
        if self._iteration(kernel.data_ptr(), v.data_ptr(), a.data_ptr(), u.data_ptr(),
                           Kv.data_ptr(), col.data_ptr(), B, K, torch.get_num_threads()) != 0:
            raise MemoryError('sinkhorn: could not allocate the per-thread column sums')
        return u, Kv, col

    # Return codes of run_loop (csrc/sinkhorn_cpu.c).
    CONVERGED, MAX_ITERS, NONFINITE_COLUMNS, OUT_OF_RANGE = 0, 1, 2, 3
    MAX_ANDERSON = 7

    def run_loop(self, kernel, a, b, u, v, Kv, col, max_iters: int, tol: float, anderson: int,
                 log_absorb: float):
        """Iterate in C until converged, ``max_iters``, or a rescue the caller must do.

        ``u, v, Kv, col`` (``col = kernelᵀ u`` on entry) are updated in place and must be
        contiguous fp32. Returns ``(status, iterations used, last column error)``.
        """
        for name, t in (('u', u), ('v', v), ('Kv', Kv), ('col', col), ('a', a), ('b', b)):
            if not (t.is_contiguous() and t.dtype == torch.float32 and t.device.type == 'cpu'):
                raise RuntimeError(f'run_loop: {name} must be a contiguous fp32 CPU tensor')
        if not 0 <= anderson <= self.MAX_ANDERSON:
            raise ValueError(f'run_loop supports anderson <= {self.MAX_ANDERSON}, got {anderson}')
        B, K = kernel.shape
        iters, error = ctypes.c_int64(0), ctypes.c_double(math.inf)
        status = self._loop(kernel.data_ptr(), a.data_ptr(), b.data_ptr(), u.data_ptr(),
                            v.data_ptr(), Kv.data_ptr(), col.data_ptr(), B, K, max_iters, tol,
                            anderson, log_absorb, torch.get_num_threads(), ctypes.byref(iters),
                            ctypes.byref(error))
        if status < 0:
            raise MemoryError('sinkhorn: the fused CPU loop could not allocate its buffers')
        return status, iters.value, error.value

    def scale_rows_cols_(self, kernel: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``kernel`` ← ``diag(u) kernel diag(v)``, in place."""
        B, K = kernel.shape
        self._scale(kernel.data_ptr(), u.data_ptr(), v.data_ptr(), B, K, torch.get_num_threads())
        return kernel


def kernels() -> Optional[NativeKernels]:
    """The compiled kernels, building them on first call; ``None`` if unavailable."""
    global _loaded, _failed_reason
    if _loaded is not None or _failed_reason is not None:
        return _loaded
    with _lock:
        if _loaded is None and _failed_reason is None:
            try:
                _loaded = _build_and_load()
            except _Unavailable as exc:
                _failed_reason = str(exc)
                logger.info('vlp_codebook: fused CPU Sinkhorn kernels unavailable (%s); '
                            'using the torch path', exc)
    return _loaded


def disabled_reason() -> Optional[str]:
    """Why :func:`kernels` returned ``None`` (``None`` if it did not, or was not called)."""
    return _failed_reason


class _Unavailable(RuntimeError):
    pass


def _build_and_load() -> NativeKernels:
    if os.environ.get('VLP_CODEBOOK_NATIVE', '1').strip().lower() in ('0', 'false', 'no', 'off'):
        raise _Unavailable('disabled by VLP_CODEBOOK_NATIVE=0')
    if platform.system() != 'Linux':
        raise _Unavailable(f'only built on Linux, this is {platform.system()}')
    compiler = os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')
    if not compiler:
        raise _Unavailable('no C compiler found (set CC, or install gcc)')
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + ' '.join([compiler] + _FLAGS).encode()
                         + platform.machine().encode() + _cpu_flags().encode()).hexdigest()[:16]
    cache = Path(os.environ.get('VLP_CODEBOOK_CACHE', Path.home() / '.cache' / 'vlp_codebook'))
    target = cache / 'native' / key / 'libvlp_sinkhorn_cpu.so'
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _Unavailable(f'cannot create the build cache {target.parent}: {exc}') from exc
        # Build under a unique name and rename: concurrent processes (DDP ranks) never load a
        # half-written library.
        fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
        os.close(fd)
        cmd = [compiler, *_FLAGS, str(_SOURCE), '-o', tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            os.unlink(tmp)
            raise _Unavailable(f'compiler failed to run: {exc}') from exc
        if proc.returncode != 0:
            os.unlink(tmp)
            raise _Unavailable(f'compilation failed ({" ".join(cmd)}): {proc.stderr.strip()[-500:]}')
        os.replace(tmp, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        raise _Unavailable(f'cannot load {target}: {exc}') from exc
    logger.debug('vlp_codebook: loaded fused CPU Sinkhorn kernels from %s', target)
    return NativeKernels(lib, target)


def _cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key: the build uses -march=native)."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('flags'):
                return line
    except OSError:
        pass
    return platform.processor()
