"""``codis_blip_retrieval``: LAVIS's BLIP retrieval model plus the CODIS codebook terms.

Same inputs, architecture and LAVIS losses as ``blip_retrieval``; a ``blip_retrieval`` YAML
becomes a CODIS one by changing ``arch``. BLIP checkpoints load, the codebook starts fresh.

Usage::

    >>> import vlp_codebook_lavis
    >>> from lavis.models import load_model
    >>> model = load_model('codis_blip_retrieval', 'tiny')   # 'coco', 'flickr': BLIP-base size
    >>> model.tokenizer.enc_token_id
    30523
"""
from __future__ import annotations

from lavis.models.blip_models.blip_retrieval import BlipRetrieval

from vlp_codebook_lavis.codis_mixin import CodisLossMixin
from vlp_codebook_lavis.encoders import add_blip_special_tokens
from vlp_codebook_lavis.paths import model_configs

__all__ = ['CodisBlipRetrieval']


class CodisBlipRetrieval(CodisLossMixin, BlipRetrieval):
    """BLIP retrieval (ITC + ITM) + CODIS codebook terms.

    Args: those of LAVIS's ``BlipRetrieval`` (``image_encoder, text_encoder, queue_size,
    alpha=0.4, embed_dim=256, momentum=0.995, negative_all_rank=False, max_txt_len=35``) plus
    ``tokenizer``, ``codebook_loss``, ``intra_modal_loss`` as in
    :class:`~vlp_codebook_lavis.models.CodisRetrieval`. ``forward`` returns a
    :class:`~vlp_codebook_lavis.outputs.CodisBlipOutput`.
    """

    PRETRAINED_MODEL_CONFIG_DICT = model_configs('codis_blip_retrieval', 'coco', 'flickr', 'tiny')
    codis_uses_ids = True

    lavis_defaults = dict(queue_size=0, alpha=0.4, embed_dim=256, momentum=0.995, negative_all_rank=False,
                          max_txt_len=35)

    def init_tokenizer(self):
        return add_blip_special_tokens(super().init_tokenizer())

    def load_config_weights(self, cfg) -> None:
        super().load_config_weights(cfg)
        self.reset_queue_ptr()
