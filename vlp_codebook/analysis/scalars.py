"""Read a training run's logged scalars (mmengine's ``vis_data/scalars.json``).

mmengine's ``LocalVisBackend`` appends one JSON object per line to
``WORK_DIR/<timestamp>/vis_data/scalars.json``:

* training lines (``LoggerHook``, every ``interval`` iterations): ``lr``, ``loss``, every
  ``loss_*`` term, logged statistics (``code_perplexity``, ``temperature``...), ``epoch``,
  ``iter``, ``step`` (= iteration);
* validation lines: the metrics (``retrieval/txt_r1``...), ``step`` (= epoch, or iteration for
  iteration-based training);
* codebook lines (:class:`~vlp_codebook.engine.plot_hook.TrainingPlotsHook`, after each training
  epoch and each validation): ``codebook/dead_codewords``, ``codebook/usage_perplexity``,
  ``codebook/num_codewords``, ``epoch``, ``iter``, ``step``.

Example::

    >>> log = read_scalars(find_scalars('work_dirs/codis_demo'))
    >>> steps, values = log.series('train', 'loss')
"""
from __future__ import annotations

import glob
import json
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ['ScalarLog', 'find_scalars', 'read_scalars', 'read_usage', 'CODEBOOK_PREFIX']

CODEBOOK_PREFIX = 'codebook/'


@dataclass
class ScalarLog:
    """The lines of a ``scalars.json``, by kind (each a list of dicts, in file order)."""

    train: List[dict] = field(default_factory=list)
    val: List[dict] = field(default_factory=list)
    codebook: List[dict] = field(default_factory=list)

    def series(self, kind: str, key: str, x: str = 'step') -> Tuple[List[float], List[float]]:
        """``(xs, values)`` of ``key`` over the ``kind`` lines that have it; a later line with the
        same ``x`` (a resumed run repeating a step) replaces the earlier one."""
        points: Dict[float, float] = {}
        for record in getattr(self, kind):
            if key in record and x in record:
                points[record[x]] = record[key]
        xs = sorted(points)
        return xs, [points[value] for value in xs]

    def keys(self, kind: str) -> List[str]:
        """Every key of the ``kind`` lines, in first-seen order."""
        seen: Dict[str, None] = {}
        for record in getattr(self, kind):
            seen.update(dict.fromkeys(record))
        return list(seen)


def find_scalars(path: str) -> str:
    """The ``scalars.json`` of ``path``: the file itself, a ``vis_data`` folder, a run folder
    (``<timestamp>/``) or a work dir (its latest run that has one).

    Raises:
        FileNotFoundError: naming ``path`` when there is no such file under it.
    """
    if osp.isfile(path):
        return path
    if not osp.isdir(path):
        raise FileNotFoundError(f'{path!r} does not exist (expected a work dir or a scalars.json)')
    for pattern in ('scalars.json', osp.join('vis_data', 'scalars.json'), osp.join('*', 'vis_data', 'scalars.json')):
        found = sorted(glob.glob(osp.join(glob.escape(path), pattern)))
        if found:
            return found[-1]    # run folders are timestamps (YYYYmmdd_HHMMSS): the last is the latest
    raise FileNotFoundError(f'no vis_data/scalars.json under {path!r}: is it a work dir of a run that logged '
                            'at least once (with the default LocalVisBackend)?')


def read_scalars(path: str) -> ScalarLog:
    """Parse a ``scalars.json`` into training, validation and codebook lines.

    Raises:
        ValueError: a line that is not a JSON object (the message names the file and line).
    """
    log = ScalarLog()
    with open(path, encoding='utf-8') as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f'{path}, line {number}: not JSON ({error})') from None
            if not isinstance(record, dict):
                raise ValueError(f'{path}, line {number}: expected a JSON object, got {type(record).__name__}')
            if any(key.startswith(CODEBOOK_PREFIX) for key in record):
                log.codebook.append(record)
            elif 'iter' in record:
                log.train.append(record)
            else:
                log.val.append(record)
    return log


def read_usage(path: str) -> Optional[List[float]]:
    """The codeword usage of a ``plots/codebook_usage.json`` (None if there is no such file).

    Raises:
        ValueError: the file is not JSON, or its ``usage`` is not a list of numbers (named in the message).
    """
    if not osp.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as handle:
            usage = json.load(handle).get('usage')
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f'{path}: not a JSON object with a "usage" list ({type(error).__name__}: {error}); '
                         'delete it to read the usage from the checkpoint') from None
    if type(usage) is not list or not all(type(v) in (int, float) for v in usage):
        raise ValueError(f'{path}: "usage" must be a list of numbers, got {type(usage).__name__}; delete the '
                         'file to read the usage from the checkpoint')
    return usage
