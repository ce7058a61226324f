"""PNG pictures of a training run (matplotlib's Agg canvas; no display, no pyplot state).

* :func:`plot_losses` -- one panel per loss term (``loss`` is their weighted sum) over iterations;
* :func:`plot_retrieval` -- text and image retrieval R@k over epochs;
* :func:`plot_codebook` -- codebook health: usage per codeword (sorted), perplexity over
  iterations, dead codewords over epochs;
* :func:`plot_gallery` -- query captions and their top-k images, the correct image framed green;
* :func:`plot_run` -- all of them from a :class:`~vlp_codebook.analysis.scalars.ScalarLog`.

Each function writes one PNG and returns its path (or None when the log has nothing to draw).
``TrainingPlotsHook`` calls :func:`plot_run` at each validation and at the end of training;
``python -m vlp_codebook.tools.plot WORK_DIR`` afterwards.
"""
from __future__ import annotations

import math
import os
import os.path as osp
import re
from typing import Dict, List, Optional, Sequence

import numpy as np

from vlp_codebook.analysis.scalars import ScalarLog

__all__ = ['new_figure', 'save_figure', 'plot_losses', 'plot_retrieval', 'plot_codebook', 'plot_gallery',
           'plot_run', 'RECALL_KEY']

# 'retrieval/txt_r1', 'txt_r10' ... (mmengine prefixes the metric's names with its prefix)
RECALL_KEY = re.compile(r'^(?:.*/)?(txt|img)_r(\d+)$')
GREEN, GREY = '#1a9850', '#9e9e9e'


def _integer_ticks():
    """A tick locator with whole numbers only (epochs, counts)."""
    from matplotlib.ticker import MaxNLocator
    return MaxNLocator(integer=True)


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` on an Agg canvas (never pyplot: no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str) -> str:
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    figure.savefig(path, format='png')
    return path


def _grid(count: int, columns: int):
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def plot_losses(log: ScalarLog, path: str, columns: int = 4) -> Optional[str]:
    """One panel per ``loss*`` key of the training lines, over iterations."""
    names = [key for key in log.keys('train') if key.startswith('loss')]
    if not names:
        return None
    rows, columns = _grid(len(names), columns)
    figure = new_figure(3.2 * columns, 2.4 * rows)
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        steps, values = log.series('train', name)
        axes.plot(steps, values, color='#2c7fb8' if name != 'loss' else 'black', linewidth=1.2)
        axes.set_title(name if name != 'loss' else 'loss (weighted sum)', fontsize=9)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if index >= len(names) - columns:
            axes.set_xlabel('iteration', fontsize=8)
    figure.suptitle('Training losses (logged every LoggerHook interval, window mean)', fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_retrieval(log: ScalarLog, path: str) -> Optional[str]:
    """Text retrieval (image -> text) and image retrieval (text -> image) R@k over epochs."""
    curves: Dict[str, Dict[int, str]] = {'txt': {}, 'img': {}}
    for key in log.keys('val'):
        match = RECALL_KEY.match(key)
        if match:
            curves[match.group(1)][int(match.group(2))] = key
    if not any(curves.values()):
        return None
    figure = new_figure(9, 3.4)
    for index, (kind, title) in enumerate((('txt', 'Text retrieval (TR@k)'), ('img', 'Image retrieval (IR@k)'))):
        axes = figure.add_subplot(1, 2, index + 1)
        for k in sorted(curves[kind]):
            epochs, values = log.series('val', curves[kind][k])
            axes.plot(epochs, values, marker='o', label=f'R@{k}')
            if values:
                axes.annotate(f'{values[-1]:.1f}', (epochs[-1], values[-1]), textcoords='offset points',
                              xytext=(4, 0), fontsize=7, va='center')
        axes.set_title(title, fontsize=10)
        axes.set_xlabel('epoch (validation step)', fontsize=8)
        axes.set_ylabel('recall (%)', fontsize=8)
        axes.set_ylim(0, 104)
        axes.xaxis.set_major_locator(_integer_ticks())
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc='upper left')
    figure.tight_layout()
    return save_figure(figure, path)


def plot_codebook(log: ScalarLog, path: str, usage: Optional[Sequence[float]] = None,
                  dead_fraction: float = 0.01) -> Optional[str]:
    """Usage per codeword (sorted, relative to uniform), perplexity over iterations (the
    students' batch mass ``code_perplexity``, the EMA usage's at each record) and dead
    codewords over epochs."""
    has_train = any(key in log.keys('train') for key in ('code_perplexity', 'code_plan_perplexity'))
    if usage is None and not log.codebook and not has_train:
        return None
    figure = new_figure(13, 3.4)
    axes = figure.add_subplot(1, 3, 1)
    if usage is not None:
        usage = np.asarray(usage, dtype=np.float64)
        relative = np.sort(usage / usage.sum() * usage.size)[::-1]
        dead = int((relative < dead_fraction).sum())
        axes.bar(np.arange(relative.size), np.maximum(relative, 1e-6), width=1.0, color='#2c7fb8')
        axes.set_yscale('log')
        axes.axhline(1.0, color='black', linewidth=0.8, linestyle=':', label='uniform')
        axes.axhline(dead_fraction, color='#d73027', linewidth=0.8, linestyle='--',
                     label=f'dead (< {dead_fraction:g} x uniform)')
        axes.set_title(f'Codeword usage: K={usage.size}, {dead} dead', fontsize=10)
        axes.set_xlabel('codewords, sorted by usage', fontsize=8)
        axes.set_ylabel('usage / uniform share', fontsize=8)
        axes.legend(fontsize=7)
    else:
        axes.text(0.5, 0.5, 'no usage vector recorded', ha='center', va='center', transform=axes.transAxes)
        axes.set_axis_off()

    axes = figure.add_subplot(1, 3, 2)
    for key, label in (('code_perplexity', 'batch codeword mass'), ('code_plan_perplexity', 'per-instance plan')):
        steps, values = log.series('train', key)
        if steps:
            axes.plot(steps, values, linewidth=1.2, label=label)
    steps, values = log.series('codebook', 'codebook/usage_perplexity')
    if steps:
        axes.plot(steps, values, marker='o', linewidth=1.2, label='EMA usage')
    _, sizes = log.series('codebook', 'codebook/num_codewords')
    if sizes:
        axes.axhline(sizes[-1], color='black', linewidth=0.8, linestyle=':', label=f'K = {int(sizes[-1])}')
    axes.set_title('Codebook perplexity (1 = collapsed, K = uniform)', fontsize=10)
    axes.set_xlabel('iteration', fontsize=8)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)

    axes = figure.add_subplot(1, 3, 3)
    # epoch-based runs record once per epoch; iteration-based ones keep epoch 0: use iterations
    by_epoch = len({record.get('epoch') for record in log.codebook}) == len(log.codebook)
    xs, dead_counts = log.series('codebook', 'codebook/dead_codewords', x='epoch' if by_epoch else 'step')
    axes.plot(xs, dead_counts, marker='o', color='#d73027')
    axes.xaxis.set_major_locator(_integer_ticks())
    axes.yaxis.set_major_locator(_integer_ticks())
    axes.set_title('Dead codewords', fontsize=10)
    axes.set_xlabel('epoch' if by_epoch else 'iteration', fontsize=8)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


def _image_array(image) -> np.ndarray:
    """(3, H, W) or (H, W, 3), floats in [0, 1] or uint8 (tensor or array) -> (H, W, 3) floats."""
    array = np.asarray(image.detach().cpu() if hasattr(image, 'detach') else image)
    array = array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    return np.clip(array, 0.0, 1.0)


def plot_gallery(queries: List[dict], path: str, title: str = '') -> Optional[str]:
    """Rows of ``query text | top-k images`` of :func:`~vlp_codebook.analysis.gallery.retrieval_gallery`'s
    ``queries``; the correct image framed green."""
    if not queries:
        return None
    k = max(len(query['images']) for query in queries)
    figure = new_figure(2.6 + 1.6 * k, 1.75 * len(queries) + 0.5)
    grid = figure.add_gridspec(len(queries), k + 1, width_ratios=[2.6] + [1.6] * k)
    for row, query in enumerate(queries):
        axes = figure.add_subplot(grid[row, 0])
        axes.set_axis_off()
        found = f'correct image at rank {query["rank"] + 1}'
        axes.text(0.0, 0.5, _wrap(f'"{query["text"]}"', 30) + f'\n\n{found}', fontsize=8, va='center',
                  ha='left', transform=axes.transAxes)
        for column, (image, correct, score) in enumerate(zip(query['images'], query['correct'], query['scores'])):
            axes = figure.add_subplot(grid[row, column + 1])
            axes.imshow(_image_array(image), interpolation='nearest')
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_edgecolor(GREEN if correct else GREY)
                spine.set_linewidth(4 if correct else 1)
            label = f'#{column + 1}  {score:.2f}' + ('  correct' if correct else '')
            axes.set_title(label, fontsize=8, color=GREEN if correct else 'black',
                           fontweight='bold' if correct else 'normal')
    figure.suptitle(title or 'Retrieval gallery: query caption -> top images', fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def _wrap(text: str, width: int) -> str:
    import textwrap
    return '\n'.join(textwrap.wrap(text, width)) or text


def plot_run(log: ScalarLog, out_dir: str, usage: Optional[Sequence[float]] = None,
             gallery: Optional[List[dict]] = None, gallery_title: str = '',
             dead_fraction: float = 0.01) -> List[str]:
    """Every picture the log (and ``usage``/``gallery``, when given) allows; returns the paths."""
    written = [plot_losses(log, osp.join(out_dir, 'losses.png')),
               plot_retrieval(log, osp.join(out_dir, 'retrieval.png')),
               plot_codebook(log, osp.join(out_dir, 'codebook.png'), usage, dead_fraction)]
    if gallery:
        written.append(plot_gallery(gallery, osp.join(out_dir, 'gallery.png'), gallery_title))
    return [path for path in written if path]
