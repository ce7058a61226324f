"""``TrainingPlotsHook``: PNG pictures of the run in ``WORK_DIR/plots/`` at each validation and
at the end of training (see :mod:`vlp_codebook.analysis.plots`):

* ``losses.png`` -- every loss term over iterations;
* ``retrieval.png`` -- TR/IR R@k over epochs;
* ``codebook.png`` -- codeword usage (the codebook's ``usage`` buffer), perplexity over
  iterations, dead codewords over epochs;
* ``gallery.png`` -- query captions of the validation set and their top-5 images (embedding
  similarity among the first ``gallery_images`` validation images), the correct image framed.

It also logs the codebook's health (``codebook/dead_codewords``, ``codebook/usage_perplexity``,
``codebook/num_codewords``; :func:`~vlp_codebook.analysis.codebook_health.codebook_health`) to
the visualizer (``vis_data/scalars.json``) after every training epoch and validation, and keeps
the latest usage vector in ``plots/codebook_usage.json``, so that
``python -m vlp_codebook.tools.plot WORK_DIR`` redraws everything afterwards.

Cost: nothing during training iterations. One read of the (K,) usage buffer per epoch; at each
validation, reading ``scalars.json``, one embedding pass over ``gallery_images`` images and
matplotlib (about 3 s of CPU per validation for the demo). Only the main process draws and writes.

Priority ``LOW``: after ``LoggerHook`` (``BELOW_NORMAL``) has written the validation metrics.

Usage in a config::

    custom_hooks = [dict(type='TrainingPlotsHook')]                 # gallery_images=0: no gallery
"""
from __future__ import annotations

import json
import os.path as osp
from typing import Optional

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log

from vlp_codebook.engine.checkpoint_saving import atomic_write
from vlp_codebook.engine.hooks import unwrap_model
from vlp_codebook.registry import HOOKS

__all__ = ['TrainingPlotsHook', 'USAGE_FILE']

USAGE_FILE = 'codebook_usage.json'


@HOOKS.register_module()
class TrainingPlotsHook(Hook):
    """Draw the run's pictures at each validation and at the end of training, into ``out_dir``
    (relative to the work dir). The gallery shows ``gallery_top_k`` of the validation set's first
    ``gallery_images`` (0: no gallery) for ``gallery_queries`` captions; a codeword is dead below
    ``dead_fraction`` of the uniform usage share."""

    priority = 'LOW'

    def __init__(self, out_dir: str = 'plots', gallery_images: int = 100, gallery_queries: int = 4,
                 gallery_top_k: int = 5, dead_fraction: float = 0.01):
        if gallery_images < 0 or gallery_queries < 1 or gallery_top_k < 1:
            raise ValueError(f'TrainingPlotsHook: gallery_images must be >= 0 and gallery_queries, gallery_top_k '
                             f'>= 1, got {gallery_images}, {gallery_queries}, {gallery_top_k}')
        if not 0.0 < dead_fraction <= 1.0:
            raise ValueError(f'TrainingPlotsHook: dead_fraction must be in (0, 1], got {dead_fraction}')
        self.out_dir = out_dir
        self.gallery_images, self.gallery_queries, self.gallery_top_k = gallery_images, gallery_queries, gallery_top_k
        self.dead_fraction = dead_fraction
        self._recorded_at: Optional[int] = None
        self._plotted_at: Optional[int] = None
        self._warned = False

    # ------------------------------------------------------------------ hook points
    def after_train_epoch(self, runner) -> None:
        self._record_codebook(runner, epoch=runner.epoch + 1)   # the loop counts the epoch after the hooks

    def after_val_epoch(self, runner, metrics: Optional[dict] = None) -> None:
        if not self._training(runner):
            return
        self._record_codebook(runner, epoch=runner.epoch)
        self._plot(runner)

    def after_train(self, runner) -> None:
        self._record_codebook(runner, epoch=runner.epoch)
        if self._plotted_at != runner.iter:
            self._plot(runner)

    # ------------------------------------------------------------------ work
    @staticmethod
    def _training(runner) -> bool:
        return not (runner._train_loop is None or isinstance(runner._train_loop, dict))

    def _plots_dir(self, runner) -> str:
        return osp.join(runner.work_dir, self.out_dir)

    def _record_codebook(self, runner, epoch: int) -> None:
        """Log the codebook's health once per iteration count (one (K,) host read)."""
        from vlp_codebook.analysis.codebook_health import codebook_health, find_codebook
        if self._recorded_at == runner.iter:
            return
        self._recorded_at = runner.iter
        codebook = find_codebook(unwrap_model(runner.model))
        if codebook is None:
            return
        usage = codebook.usage.detach().float().cpu()
        health = codebook_health(usage, self.dead_fraction)
        if not is_main_process():
            return
        runner.visualizer.add_scalars(dict(health, epoch=epoch, iter=runner.iter), step=runner.iter)
        atomic_write(osp.join(self._plots_dir(runner), USAGE_FILE),
                     json.dumps(dict(epoch=epoch, iter=runner.iter, usage=usage.tolist())))

    def _plot(self, runner) -> None:
        from vlp_codebook.analysis.plots import plot_run
        from vlp_codebook.analysis.scalars import read_scalars, read_usage
        self._plotted_at = runner.iter
        if not is_main_process():
            return
        scalars = osp.join(runner.log_dir, 'vis_data', 'scalars.json')
        if not osp.isfile(scalars):
            if not self._warned:
                print_log(f'TrainingPlotsHook: no {scalars} (the visualizer needs a LocalVisBackend); no plots',
                          logger='current', level='WARNING')
                self._warned = True
            return
        usage = read_usage(osp.join(self._plots_dir(runner), USAGE_FILE))
        gallery = self._gallery(runner)
        title = '' if gallery is None else (
            f'Epoch {runner.epoch}: top {self.gallery_top_k} of the first '
            f'{min(self.gallery_images, len(runner._val_loop.dataloader.dataset))} validation images by embedding '
            'similarity')
        written = plot_run(read_scalars(scalars), self._plots_dir(runner), usage=usage, gallery=gallery,
                           gallery_title=title, dead_fraction=self.dead_fraction)
        print_log(f'plots: {", ".join(osp.basename(p) for p in written)} in {self._plots_dir(runner)}',
                  logger='current')

    def _gallery(self, runner):
        from vlp_codebook.analysis.gallery import retrieval_gallery
        loop = runner._val_loop
        if not self.gallery_images or loop is None or isinstance(loop, dict):
            return None
        model = unwrap_model(runner.model)
        dataset = loop.dataloader.dataset
        if not callable(getattr(model, 'extract_feats', None)) or len(dataset) == 0:
            return None    # not an image-caption retrieval model
        first = dataset[0]
        if not isinstance(first, dict) or 'texts' not in first or 'image' not in first:
            return None    # not a retrieval set (one item per image, with its captions)
        return retrieval_gallery(model, dataset, self.gallery_images, self.gallery_queries, self.gallery_top_k,
                                 batch_size=loop.dataloader.batch_size or 50)
