"""Paired-seed statistics of the benchmarks: the mean difference, its 95 % t-interval, seeds ahead."""
from __future__ import annotations

import math
import statistics
from typing import Dict, Sequence

# The retrieval metrics of the tables: TR/IR R@1/5/10 and their mean.
METRICS = ('txt_r1', 'txt_r5', 'txt_r10', 'img_r1', 'img_r5', 'img_r10', 'r_mean')

# Two-sided 95 % quantiles of Student's t for df = 1..30 (beyond: the normal's 1.96).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> Dict[str, float]:
    """Mean of ``values - baseline`` over paired seeds, its 95 % t-interval half-width, and the
    number of seeds with a positive difference."""
    diffs = [v - b for v, b in zip(values, baseline)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return dict(mean=mean, half_width=float('nan'), positive=sum(x > 0 for x in diffs), n=n)
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    half = t * statistics.stdev(diffs) / math.sqrt(n)
    return dict(mean=mean, half_width=half, positive=sum(x > 0 for x in diffs), n=n)


def mean_std(xs: Sequence[float]) -> str:
    return f'{statistics.fmean(xs):.1f}' + (f' ± {statistics.stdev(xs):.1f}' if len(xs) > 1 else '')
