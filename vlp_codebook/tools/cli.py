"""What every command-line tool does around its ``main()``.

1. :func:`prepare_process`, before torch is imported: ``OMP_WAIT_POLICY=PASSIVE`` unless set
   (OpenMP's spinning waits beside another busy process made the demo's CPU time grow more than
   10x), and this process's filters for known third-party warnings (:data:`QUIET_WARNINGS`).
2. :func:`apply_cpu_threads`: the config's ``env_cfg.cpu_threads`` sets ``torch.set_num_threads``
   when no GPU is used.
3. :func:`run_main`: an exception is printed once, as ``PROG: error: Type: message`` naming the
   config key being built, with exit status 1; the traceback goes to the run's log file (and the
   console with ``--verbose``), because ``mim run`` prints its own traceback after any failure.

Usage::

    if __name__ == '__main__':
        from vlp_codebook.tools.cli import prepare_process, run_main
        prepare_process()                      # before torch is imported
        from vlp_codebook.tools.train import main
        run_main(main, sys.argv[1:], prog='vlp_codebook.tools.train')
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, MutableMapping, Optional, Sequence

__all__ = ['forward_tool', 'QUIET_WARNINGS', 'prepare_process', 'apply_cpu_threads', 'cpu_threads_from', 'format_error',
           'run_main']

#: (message regex, category, module regex) of third-party warnings the tools silence
QUIET_WARNINGS = (
    # setuptools >= 80.9 warns (UserWarning) whenever anything imports pkg_resources (openmim does;
    # pyproject pins setuptools below 80.9 for mim's own process, which we do not control)
    (r'pkg_resources is deprecated', Warning, ''),
    (r'Deprecated call to `pkg_resources\.declare_namespace', Warning, ''),
)


def prepare_process(environ: Optional[MutableMapping[str, str]] = None) -> None:
    """OpenMP wait policy and warning filters for a tool's process (call before importing torch)."""
    environ = os.environ if environ is None else environ
    environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings('ignore', message=message, category=category, module=module)


def apply_cpu_threads(cfg: Any) -> Optional[int]:
    """Set torch's intra-op threads from ``cfg.env_cfg.cpu_threads`` when CUDA is not available.

    Returns the number of threads set, or ``None`` when nothing was changed (no key, or a GPU).

    Raises:
        ValueError: ``cpu_threads`` is not a positive integer.
    """
    import torch

    threads = (cfg.get('env_cfg') or {}).get('cpu_threads')
    if threads is None or torch.cuda.is_available():
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f'env_cfg.cpu_threads={threads!r}: expected a positive integer '
                         '(torch intra-op threads on CPU) or None')
    torch.set_num_threads(threads)
    return threads


@contextmanager
def cpu_threads_from(cfg: Any) -> Iterator[Optional[int]]:
    """:func:`apply_cpu_threads` for the duration of the block; the previous count is restored
    after it (the tools' ``main()`` also runs in-process, in tests and notebooks)."""
    import torch

    previous = torch.get_num_threads()
    threads = apply_cpu_threads(cfg)
    try:
        yield threads
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


def format_error(prog: str, error: BaseException) -> str:
    """``PROG: error: Type: message`` (+ the config key that was being built, if known)."""
    message = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    line = f'{prog}: error: {type(error).__name__}: {message}'
    config_key = getattr(error, 'config_key', None)
    if config_key:
        line += f'\n{prog}: (while building config key {config_key!r})'
    return line


def _log_traceback_to_file(error: BaseException) -> Optional[str]:
    """Write the traceback into the current mmengine log file, if a Runner opened one."""
    try:
        from mmengine.logging import MMLogger
    except ImportError:  # pragma: no cover - mmengine is a dependency
        return None
    if not MMLogger._instance_dict:
        return None
    logger = MMLogger.get_current_instance()
    text = ''.join(traceback.format_exception(type(error), error, error.__traceback__))
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, 'Traceback of the error:\n%s',
                               (text,), None)
    path = None
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            path = handler.baseFilename
    return path


def run_main(main: Callable[[List[str]], Any], argv: Sequence[str], prog: str) -> None:
    """Run a tool's ``main(argv)``; on an exception print it once and exit with status 1."""
    argv = list(argv)
    verbose = '--verbose' in argv
    try:
        main(argv)
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - every error ends the tool the same way
        if verbose:
            traceback.print_exc()
        log_file = _log_traceback_to_file(error)
        print(format_error(prog, error), file=sys.stderr)
        if not verbose:
            where = f'in {log_file}; ' if log_file else ''
            print(f'{prog}: (traceback: {where}rerun with --verbose to print it)', file=sys.stderr)
        if prog.startswith('mim '):
            print(f'{prog}: (the CalledProcessError report mim prints next only says that this script failed)',
                  file=sys.stderr)
        sys.exit(1)


def forward_tool(tool: str, script: str) -> None:
    """Body of ``vlp_codebook/.mim/tools/<tool>.py`` (what ``mim run vlp_codebook <tool>`` runs):
    run :func:`vlp_codebook.tools.<tool>.main` through :func:`run_main`.

    Python puts ``script``'s folder first on ``sys.path``; it is dropped first so that the
    forwarders (``train.py``, ``test.py``, ...) never shadow a module of the same name (the
    standard library has a ``test`` package). This module imports only the standard library,
    so importing it before that is safe; :func:`prepare_process` runs before torch is imported.
    """
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(script)):
        sys.path.pop(0)
    prepare_process()
    import importlib
    main = importlib.import_module(f'vlp_codebook.tools.{tool}').main
    run_main(main, sys.argv[1:], prog=f'mim run vlp_codebook {tool}')
