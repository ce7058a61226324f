"""``codis_pretrain``: LAVIS's ALBEF pretraining model (ITC + ITM + MLM) plus the CODIS terms.

This is the paper's pretraining objective on LAVIS's ALBEF: :math:`L = L_{code} + L_{align} +
L_{itm} + L_{mlm}`, where LAVIS's ``loss_itc`` is the cross-modal part of :math:`L_{align}` and
``intra_modal_loss`` adds the i2i/t2t part (paper ablation row b).

Unlike LAVIS's ``albef_pretrain``, ``from_config`` downloads nothing: the ViT and BERT start
random unless the config gives local weights (``vit_pretrained``: a DeiT checkpoint file,
``bert_pretrained``: a BERT directory; see :mod:`vlp_codebook_lavis.encoders`) or an ALBEF
checkpoint (``load_pretrained: true`` + ``pretrained``).

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
from vlp_codebook_lavis.encoders import build_masked_lm_encoder, build_vision_encoder, load_bert_tokenizer
from vlp_codebook_lavis.paths import plugin_path

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

    PRETRAINED_MODEL_CONFIG_DICT = {
        'base': plugin_path('configs', 'models', 'codis_pretrain_base.yaml'),
        'tiny': plugin_path('configs', 'models', 'codis_pretrain_tiny.yaml'),
    }

    def __init__(self, image_encoder, text_encoder, queue_size, embed_dim=256, mlm_mask_prob=0.15,
                 temp=0.07, momentum=0.995, alpha=0.4, max_txt_len=30, tokenizer=None,
                 codebook_loss=None, intra_modal_loss=None):
        object.__setattr__(self, '_codis_tokenizer', tokenizer)
        super().__init__(image_encoder=image_encoder, text_encoder=text_encoder, queue_size=queue_size,
                         embed_dim=embed_dim, mlm_mask_prob=mlm_mask_prob, temp=temp, momentum=momentum,
                         alpha=alpha, max_txt_len=max_txt_len)
        self.build_codis_losses(embed_dim, codebook_loss, intra_modal_loss, default_queue_size=queue_size)

    def init_tokenizer(self):
        return load_bert_tokenizer(self._codis_tokenizer)

    @classmethod
    def from_config(cls, cfg=None):
        model = cls(
            image_encoder=build_vision_encoder(cfg),
            text_encoder=build_masked_lm_encoder(cfg),
            queue_size=cfg.get('queue_size', 65536),
            embed_dim=cfg.get('embed_dim', 256),
            mlm_mask_prob=cfg.get('mlm_mask_prob', 0.15),
            temp=cfg.get('temp', 0.07),
            momentum=cfg.get('momentum', 0.995),
            alpha=cfg.get('alpha', 0.4),
            max_txt_len=cfg.get('max_txt_len', 30),
            tokenizer=cfg.get('tokenizer'),
            codebook_loss=cfg.get('codebook_loss'),
            intra_modal_loss=cfg.get('intra_modal_loss'),
        )
        # ALBEF's pretraining checkpoints keep the "bert." prefix of BertForMaskedLM
        load_weights_from_config(model, cfg, partial(model.load_from_pretrained, rename_text_keys=False))
        return model
