"""LAVIS tasks that log every loss term by name (``codis_retrieval``, ``codis_image_text_pretrain``).

LAVIS's ``BaseTask.train_step`` logs only ``loss`` and ``lr``. These are LAVIS's ``retrieval`` /
``image_text_pretrain`` tasks, plus: every ``loss_*`` field of the model output is averaged over
the epoch and all ranks and returned with LAVIS's epoch stats (``train_loss_code_i2p`` ... in
``log.txt``), and every ``run.log_freq`` iterations one line lists the current values.
Use ``run.task: codis_retrieval`` or ``run.task: codis_image_text_pretrain``.
"""
from __future__ import annotations

import logging
from typing import Dict

import torch
from lavis.common.logger import MetricLogger
from lavis.tasks.image_text_pretrain import ImageTextPretrainTask
from lavis.tasks.retrieval import RetrievalTask

__all__ = ['LossTermLoggingMixin', 'CodisRetrievalTask', 'CodisImageTextPretrainTask']


class LossTermLoggingMixin:
    """Logs the ``loss_*`` fields of the model output; put it before the LAVIS task class."""

    def train_step(self, model, samples):
        output = model(samples)
        terms = {k: v.detach().float().item() for k, v in output.items()
                 if k.startswith('loss_') and isinstance(v, torch.Tensor) and v.numel() == 1}
        meters = getattr(self, '_term_meters', None)
        if meters is not None:
            meters.update(**terms)
            self._term_step += 1
            if self._term_log_freq and (self._term_step - 1) % self._term_log_freq == 0:
                logging.info('loss terms: ' + '  '.join(f'{k}: {v:.4f}' for k, v in sorted(terms.items())))
        self.last_loss_terms: Dict[str, float] = terms
        return output['loss']

    def _train_inner_loop(self, *args, **kwargs):
        self._term_meters = MetricLogger(delimiter='  ')
        self._term_step = 0
        self._term_log_freq = kwargs.get('log_freq', 50)
        try:
            stats = super()._train_inner_loop(*args, **kwargs)
            self._term_meters.synchronize_between_processes()
            averages = {k: meter.global_avg for k, meter in self._term_meters.meters.items()}
        finally:
            self._term_meters = None
        logging.info('Averaged loss terms: ' + '  '.join(f'{k}: {v:.4f}' for k, v in sorted(averages.items())))
        stats.update({k: '{:.3f}'.format(v) for k, v in averages.items()})
        return stats


class CodisRetrievalTask(LossTermLoggingMixin, RetrievalTask):
    """LAVIS's ``retrieval`` task with per-term loss logging."""


class CodisImageTextPretrainTask(LossTermLoggingMixin, ImageTextPretrainTask):
    """LAVIS's ``image_text_pretrain`` task with per-term loss logging."""
