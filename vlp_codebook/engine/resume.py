"""Which checkpoint ``--resume`` (no path) continues from: the one ``last_checkpoint`` names if it is
intact, else the newest intact one in the work dir, said in one line.

mmengine reads ``WORK_DIR/last_checkpoint`` and resumes from whatever it names: without the file
it silently starts from scratch although ``epoch_1.pth`` is there, an empty file gives
"checkpoint '' is a directory", and a file killed while being written is loaded anyway. Here
(:func:`pick_resume_checkpoint`):

1. ``last_checkpoint`` names a local file (absolute, or moved along with the work dir: the same
   name inside it) that passes :func:`checkpoint_damage` -> that file, no message.
2. Otherwise (missing, empty, a URL, a missing or damaged file) -> the newest intact
   ``iter_N.pth`` / ``epoch_N.pth`` (or ``best_..._iter_N.pth``) in the work dir (highest N),
   with one line saying why.
   Temporary files of an interrupted save (``.iter_8.pth.XXXX.tmp``) are never candidates.
3. No checkpoint at all in the work dir -> ``None`` (train from scratch), with one line saying so.
4. Checkpoints, but none intact -> :class:`~vlp_codebook.checkpoint_io.CorruptCheckpointError`
   listing them (starting over would silently discard the run).

:func:`checkpoint_damage` reads the whole file without unpickling it: a torch checkpoint is a zip
archive, and every member's CRC must match (a truncated or zeroed file fails).
"""
from __future__ import annotations

import glob
import os.path as osp
import re
import zipfile
from typing import List, Optional, Tuple

from vlp_codebook.checkpoint_io import CorruptCheckpointError
from vlp_codebook.engine.checkpoint import is_url

__all__ = ['checkpoint_damage', 'checkpoint_steps', 'pick_resume_checkpoint']

_STEP_NAME = re.compile(r'(?:^|_)(?:epoch|iter)_(\d+)\.pth$')


def checkpoint_damage(path: str) -> Optional[str]:
    """Why ``path`` is not an intact torch checkpoint (``'0 bytes'``, ``'truncated: ...'``), or None.

    Checks the zip structure and every member's CRC; nothing is unpickled.
    """
    if not osp.isfile(path):
        return 'does not exist'
    size = osp.getsize(path)
    if size == 0:
        return '0 bytes'
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.endswith('/data.pkl') or name == 'data.pkl' for name in names):
                return f'{size} bytes, a zip archive without data.pkl (not a torch.save file)'
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f'{size} bytes, truncated or damaged ({type(error).__name__}: {str(error)[:80]})'
    if bad is not None:
        return f'{size} bytes, damaged (CRC mismatch in {bad})'
    return None


def checkpoint_steps(work_dir: str) -> List[Tuple[int, str]]:
    """``(N, path)`` of the work dir's ``iter_N.pth`` / ``epoch_N.pth`` (and ``best_*_iter_N.pth``),
    highest N first (at equal N the regular checkpoint first)."""
    found = []
    for path in glob.glob(osp.join(glob.escape(work_dir), '*.pth')):
        name = osp.basename(path)
        match = _STEP_NAME.search(name)
        if match and osp.isfile(path):
            found.append((int(match.group(1)), not name.startswith('best_'), path))
    return [(step, path) for step, _, path in sorted(found, reverse=True)]


def _pointer(work_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """(the file ``last_checkpoint`` names, if usable; else why not)."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return None, f'{pointer} is missing'
    with open(pointer, encoding='utf-8', errors='replace') as handle:
        named = handle.read().strip()
    if not named:
        return None, f'{pointer} is empty'
    if is_url(named) or '://' in named:
        return None, (f'{pointer} names {named!r}, not a file of this work dir (to resume from it, '
                      'pass it: --resume URL)')
    candidates = [named] if osp.isabs(named) else [osp.join(work_dir, named)]
    candidates.append(osp.join(work_dir, osp.basename(named)))   # the work dir was moved
    for path in candidates:
        if osp.isfile(path):
            damage = checkpoint_damage(path)
            if damage is None:
                return path, None
            return None, f'{pointer} names {path}, which is not intact ({damage})'
    return None, f'{pointer} names {named}, which does not exist'


def pick_resume_checkpoint(work_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """``(checkpoint to resume from or None for a fresh start, the line to log or None)``;
    ``CorruptCheckpointError`` when the work dir holds checkpoints but none is intact."""
    work_dir = osp.abspath(work_dir)
    path, why = _pointer(work_dir)
    if path is not None:
        return path, None
    skipped = []
    for _, candidate in checkpoint_steps(work_dir):
        damage = checkpoint_damage(candidate)
        if damage is None:
            also = f' (skipped as not intact: {"; ".join(skipped)})' if skipped else ''
            return candidate, f'--resume: {why}; resuming from the newest intact checkpoint {candidate}{also}'
        skipped.append(f'{osp.basename(candidate)}: {damage}')
    if skipped:
        raise CorruptCheckpointError(
            f'--resume: {why}, and none of the checkpoints in {work_dir} is intact: {"; ".join(skipped)}. '
            'Resume from a copy you trust with --resume PATH, or train from scratch in a new work dir.')
    others = sorted(osp.basename(p) for p in glob.glob(osp.join(glob.escape(work_dir), '*.pth')))
    note = f' (not resumed from: {", ".join(others[:5])}; pass --resume PATH for one of them)' if others else ''
    return None, f'--resume: {why}, and there is no checkpoint in {work_dir}: training starts from scratch{note}'
