"""``codis_retrieval``: LAVIS's ALBEF retrieval model plus the CODIS codebook terms.

``albef_retrieval`` plus the terms of :class:`~vlp_codebook_lavis.codis_mixin.CodisLossMixin`:
an ``albef_retrieval`` YAML becomes a CODIS one by changing ``arch``; ALBEF checkpoints load.

Usage::

    >>> import vlp_codebook_lavis                      # registers the codis_* names in LAVIS
    >>> from lavis.models import load_model
    >>> model = load_model('codis_retrieval', 'tiny')  # 'coco', 'flickr': ALBEF-base size
    >>> sorted(model.PRETRAINED_MODEL_CONFIG_DICT)
    ['coco', 'flickr', 'tiny']
"""
from __future__ import annotations

from lavis.models.albef_models.albef_retrieval import AlbefRetrieval

from vlp_codebook_lavis.codis_mixin import CodisLossMixin
from vlp_codebook_lavis.paths import model_configs

__all__ = ['CodisRetrieval']


class CodisRetrieval(CodisLossMixin, AlbefRetrieval):
    """ALBEF retrieval (ITC with momentum distillation + ITM) + CODIS codebook terms.

    Args: those of LAVIS's ``AlbefRetrieval`` (``image_encoder, text_encoder, queue_size,
    embed_dim=256, temp=0.07, use_distill=True, momentum=0.995, alpha=0.4, max_txt_len=30``), plus

        tokenizer: local tokenizer directory (default: the offline bert-base-uncased vocab).
        codebook_loss: the ``codebook_loss`` block (dict), see :mod:`vlp_codebook_lavis.codis_mixin`.
        intra_modal_loss: the ``intra_modal_loss`` block, or None (off).

    ``forward(samples)``: LAVIS's retrieval samples -> :class:`~vlp_codebook_lavis.outputs.CodisAlbefOutput`.
    """

    PRETRAINED_MODEL_CONFIG_DICT = model_configs('codis_retrieval', 'coco', 'flickr', 'tiny')
    codis_uses_ids = True

    lavis_defaults = dict(queue_size=0, embed_dim=256, temp=0.07, use_distill=True, momentum=0.995, alpha=0.4,
                          max_txt_len=30)
