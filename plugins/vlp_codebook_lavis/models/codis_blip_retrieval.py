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

from vlp_codebook_lavis.codis_mixin import CodisLossMixin, load_weights_from_config
from vlp_codebook_lavis.encoders import (add_blip_special_tokens, build_vision_encoder, build_xbert_encoder,
                                         load_bert_tokenizer)
from vlp_codebook_lavis.paths import plugin_path

__all__ = ['CodisBlipRetrieval']


class CodisBlipRetrieval(CodisLossMixin, BlipRetrieval):
    """BLIP retrieval (ITC + ITM) + CODIS codebook terms.

    Args: those of LAVIS's ``BlipRetrieval`` (``image_encoder, text_encoder, queue_size,
    alpha=0.4, embed_dim=256, momentum=0.995, negative_all_rank=False, max_txt_len=35``) plus
    ``tokenizer``, ``codebook_loss``, ``intra_modal_loss`` as in
    :class:`~vlp_codebook_lavis.models.CodisRetrieval`. ``forward`` returns a
    :class:`~vlp_codebook_lavis.outputs.CodisBlipOutput`.
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        'coco': plugin_path('configs', 'models', 'codis_blip_retrieval_coco.yaml'),
        'flickr': plugin_path('configs', 'models', 'codis_blip_retrieval_flickr.yaml'),
        'tiny': plugin_path('configs', 'models', 'codis_blip_retrieval_tiny.yaml'),
    }
    codis_uses_ids = True

    def __init__(self, image_encoder, text_encoder, queue_size, alpha=0.4, embed_dim=256, momentum=0.995,
                 negative_all_rank=False, max_txt_len=35, tokenizer=None, codebook_loss=None,
                 intra_modal_loss=None):
        object.__setattr__(self, '_codis_tokenizer', tokenizer)
        super().__init__(image_encoder=image_encoder, text_encoder=text_encoder, queue_size=queue_size,
                         alpha=alpha, embed_dim=embed_dim, momentum=momentum,
                         negative_all_rank=negative_all_rank, max_txt_len=max_txt_len)
        self.build_codis_losses(embed_dim, codebook_loss, intra_modal_loss, default_queue_size=queue_size)

    def init_tokenizer(self):
        return add_blip_special_tokens(load_bert_tokenizer(self._codis_tokenizer))

    @classmethod
    def from_config(cls, cfg=None):
        model = cls(
            image_encoder=build_vision_encoder(cfg),
            text_encoder=build_xbert_encoder(cfg),
            queue_size=cfg.get('queue_size', 0),
            alpha=cfg.get('alpha', 0.4),
            embed_dim=cfg.get('embed_dim', 256),
            momentum=cfg.get('momentum', 0.995),
            negative_all_rank=cfg.get('negative_all_rank', False),
            max_txt_len=cfg.get('max_txt_len', 35),
            tokenizer=cfg.get('tokenizer'),
            codebook_loss=cfg.get('codebook_loss'),
            intra_modal_loss=cfg.get('intra_modal_loss'),
        )
        load_weights_from_config(model, cfg)
        model.reset_queue_ptr()
        return model
