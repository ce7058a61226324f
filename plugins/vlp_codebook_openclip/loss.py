r"""``CodebookClipLoss``: open_clip's own loss, unchanged, plus the CODIS terms.

.. math::
    L = L_{\mathrm{open\_clip}} + \sum_{\text{term}} L_{\text{term}}

where :math:`L_{\mathrm{open\_clip}}` is computed by the open_clip loss object given
(``open_clip.ClipLoss`` with its ``local_loss`` / ``gather_with_grad`` semantics, or what
``open_clip.create_loss(args)`` built) and the terms are those
:class:`~vlp_codebook_openclip.model.CodebookCLIP` returned under ``codis_losses``
(``codebook_i2p``, ``codebook_t2p``, ``codebook_ot_v``, ``codebook_ot_t``, ``intra_i2i``,
``intra_t2t``). With ``output_dict=True`` (open_clip's training loop) the result is the dict of
every named term, which open_clip sums, logs and writes to TensorBoard; otherwise their sum.

Logging: :meth:`bind_logging` (called by ``vlp_codebook_openclip.train`` once per epoch) gives
the loss open_clip's TensorBoard writer and ``--log-every-n-steps``; every that many steps the
codebook's statistics (usage perplexity, the plans' perplexity, Sinkhorn iterations) are logged
with open_clip's logger and written as ``train/<name>`` scalars, beside open_clip's own.

Under DDP each term is the mean over this rank's rows (the codebook plans and the intra keys are
those of the joint batch), so DDP's gradient average is the joint-batch gradient, as for
``ClipLoss(local_loss=True, gather_with_grad=True)``.
"""
from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional

import torch
from torch import nn

__all__ = ['CodebookClipLoss']


class CodebookClipLoss(nn.Module):
    """open_clip's loss plus the terms ``CodebookCLIP`` computed.

    Args:
        base_loss: the open_clip loss object (e.g. ``open_clip.ClipLoss(local_loss=True,
            gather_with_grad=True, rank=r, world_size=w)``); called with every model output
            except the CODIS ones.
    """

    def __init__(self, base_loss: nn.Module):
        super().__init__()
        if not callable(base_loss):
            raise TypeError(f'base_loss must be an open_clip loss module, got {type(base_loss).__name__}')
        self.base_loss = base_loss
        self._tb_writer = None
        self._log_every = 0
        self._step = 0
        self._is_master = True

    def bind_logging(self, tb_writer=None, log_every_n_steps: int = 100, first_step: int = 0,
                     is_master: bool = True) -> None:
        """Log the codebook statistics every ``log_every_n_steps`` calls from global step
        ``first_step`` on (with ``logging`` and, when given, a TensorBoard ``SummaryWriter``)."""
        self._tb_writer = tb_writer
        self._log_every = int(log_every_n_steps)
        self._step = int(first_step)
        self._is_master = bool(is_master)

    def forward(self, *args, codis_losses: Optional[Mapping[str, torch.Tensor]] = None,
                codis_stats=None, output_dict: bool = False, **model_out):
        base = self.base_loss(*args, **model_out, output_dict=True)
        if not isinstance(base, dict):          # a loss without output_dict support
            base = {'contrastive_loss': base}
        losses: Dict[str, torch.Tensor] = dict(base)
        for name, value in (codis_losses or {}).items():
            if name in losses:
                raise ValueError(f'the CODIS term {name!r} has the name of one of the open_clip loss terms')
            losses[name] = value
        if codis_stats is not None and self._log_every > 0:
            if self._is_master and self._step % self._log_every == 0:
                self._log(codis_stats.as_floats())
            self._step += 1
        return losses if output_dict else sum(losses.values())

    def _log(self, stats: Mapping[str, float]) -> None:
        logging.info('codebook step %d: %s', self._step,
                     ', '.join(f'{name} {value:.4g}' for name, value in stats.items()))
        if self._tb_writer is not None:
            for name, value in stats.items():
                self._tb_writer.add_scalar(f'train/{name}', value, self._step)
