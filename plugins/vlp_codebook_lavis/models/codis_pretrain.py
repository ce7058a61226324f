"""``codis_pretrain``: LAVIS's ALBEF pretraining model (ITC + ITM + MLM) plus the CODIS terms.

This is the paper's pretraining objective on LAVIS's ALBEF: :math:`L = L_{code} + L_{align} +
L_{itm} + L_{mlm}`, where LAVIS's ``loss_itc`` is the cross-modal part of :math:`L_{align}` and
``intra_modal_loss`` adds the i2i/t2t part (paper ablation row b).

Unlike LAVIS's ``albef_pretrain``, ``from_config`` downloads nothing (local weights:
:mod:`vlp_codebook_lavis.encoders`, or ``load_pretrained: true`` + ``pretrained``).

Usage::

    >>> import vlp_codebook_lavis
    >>> from lavis.models import load_model
    >>> model = load_model('codis_pretrain', 'tiny')   # 'base': ALBEF-base size
    >>> type(model).__name__
    'CodisPretrain'
"""
from __future__ import annotations

from functools import partial

from lavis.models.albef_models.albef_pretrain import AlbefPretrain

from vlp_codebook_lavis.codis_mixin import CodisLossMixin, load_weights_from_config
from vlp_codebook_lavis.encoders import build_masked_lm_encoder
from vlp_codebook_lavis.paths import model_configs

__all__ = ['CodisPretrain']


class CodisPretrain(CodisLossMixin, AlbefPretrain):
    """ALBEF pretraining + CODIS codebook terms (and optional intra-modal terms).

    Args: those of LAVIS's ``AlbefPretrain`` (``image_encoder, text_encoder, queue_size,
    embed_dim=256, mlm_mask_prob=0.15, temp=0.07, momentum=0.995, alpha=0.4, max_txt_len=30``)
    plus ``tokenizer``, ``codebook_loss``, ``intra_modal_loss`` as in
    :class:`~vlp_codebook_lavis.models.CodisRetrieval`.

    ``forward(samples)``: LAVIS's pretraining samples (``image``, ``text_input``, ``epoch``,
    ``iters``, ``num_iters_per_epoch``) -> :class:`~vlp_codebook_lavis.outputs.CodisAlbefOutput`
    with ``loss_itc, loss_itm, loss_mlm`` and the CODIS terms.
    """

    PRETRAINED_MODEL_CONFIG_DICT = model_configs('codis_pretrain', 'base', 'tiny')

    lavis_defaults = dict(queue_size=65536, embed_dim=256, mlm_mask_prob=0.15, temp=0.07, momentum=0.995,
                          alpha=0.4, max_txt_len=30)

    @classmethod
    def build_text_encoder(cls, cfg):
        return build_masked_lm_encoder(cfg)

    def load_config_weights(self, cfg) -> None:
        # ALBEF's pretraining checkpoints keep the "bert." prefix of BertForMaskedLM
        load_weights_from_config(self, cfg, partial(self.load_from_pretrained, rename_text_keys=False))
