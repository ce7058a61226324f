"""Check the CSV files open_clip_train will read, before it reads them.

open_clip_train's ``CsvDataset`` reads ``--train-data`` / ``--val-data`` with pandas and takes
the ``--csv-img-key`` and ``--csv-caption-key`` columns: a wrong ``--csv-separator`` surfaces as
``KeyError: 'filepath'``, and an empty caption is read as NaN and trained on as the text ``"nan"``.
:func:`check_csv_args` refuses both with a message naming the flag, the file and the rows.
"""
from __future__ import annotations

import argparse
from typing import Sequence

__all__ = ['check_csv_args', 'check_csv']


def check_csv(path: str, flag: str, sep: str, img_key: str, caption_key: str) -> int:
    """Raise ``ValueError`` if ``path`` lacks the two columns or has an empty entry; returns the rows."""
    import pandas as pd

    frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    missing = [key for key in (img_key, caption_key) if key not in frame.columns]
    if missing:
        shown = ', '.join(repr(c) for c in list(frame.columns)[:4])
        raise ValueError(f'{flag} {path}: no column {missing[0]!r} when read with --csv-separator {sep!r} (columns: '
                         f'{shown}); is the separator right (a tab is --csv-separator $\'\\t\'), and are '
                         f'--csv-img-key {img_key!r} / --csv-caption-key {caption_key!r} the header\'s names?')
    for key in (img_key, caption_key):
        empty = [int(i) + 2 for i in frame.index[frame[key].str.strip() == '']]   # file lines (header = 1)
        if empty:
            raise ValueError(f'{flag} {path}: {len(empty)} empty {key!r} entr{"y" if len(empty) == 1 else "ies"} '
                             f'(lines {empty[:5]}); open_clip would read an empty caption as the text "nan". '
                             'Fill or remove those rows')
    return len(frame)


def check_csv_args(argv: Sequence[str]) -> None:
    """:func:`check_csv` on the CSV data files of open_clip_train's arguments ``argv``."""
    parser = argparse.ArgumentParser(add_help=False)
    for name, default in (('--train-data', None), ('--val-data', None), ('--dataset-type', 'auto'),
                          ('--csv-separator', '\t'), ('--csv-img-key', 'filepath'), ('--csv-caption-key', 'title')):
        parser.add_argument(name, default=default)
    args, _ = parser.parse_known_args(list(argv))
    for flag, path in (('--train-data', args.train_data), ('--val-data', args.val_data)):
        csv = args.dataset_type == 'csv' or (args.dataset_type == 'auto' and str(path).split('.')[-1] in ('csv', 'tsv'))
        if path and csv:
            check_csv(path, flag, args.csv_separator, args.csv_img_key, args.csv_caption_key)
