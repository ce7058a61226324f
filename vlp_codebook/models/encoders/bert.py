r"""BERT text encoder and BERT fusion encoder (cross-attention to image tokens), as ALBEF.

ALBEF and CODIS split BERT-base into a **text encoder** (embeddings + first 6 layers,
:class:`BertTextEncoder`) and a **fusion encoder** (last 6 layers, each with cross-attention
from text tokens to image tokens, :class:`BertFusionEncoder`). A fusion layer, with text states
:math:`h` (N, L, D) and image tokens :math:`v` (N, P, D_v), post-norm as BERT:

.. math::
    h &\leftarrow \mathrm{LN}(h + \mathrm{SelfAttn}(h, h; \text{text mask})) \\
    h &\leftarrow \mathrm{LN}(h + \mathrm{CrossAttn}(q = h,\ k = v = v W; \text{image mask})) \\
    h &\leftarrow \mathrm{LN}(h + \mathrm{FFN}(h))

Attention probabilities are a softmax in fp32 whatever the autocast dtype.

**Pretrained weights** come from a LOCAL BERT checkpoint only (a ``save_pretrained`` directory or
a state-dict file; hub names are never downloaded). The fusion encoder takes layers
``offset .. offset+num_layers-1`` (default: the checkpoint's last ``num_layers``) and starts its
cross-attention fresh unless ``load_cross_attention=True`` (ALBEF checkpoints carry it).
Parameter names follow transformers' ``BertLayer``.

Example::

    >>> import torch
    >>> from vlp_codebook.registry import MODELS
    >>> text = MODELS.build(dict(type='BertTextEncoder', vocab_size=100, hidden_size=32,
    ...                          num_layers=1, num_heads=4))
    >>> fusion = MODELS.build(dict(type='BertFusionEncoder', hidden_size=32, num_layers=1,
    ...                            num_heads=4, encoder_width=48))
    >>> ids, mask = torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    >>> h = text(ids, mask)                                   # (2, 7, 32)
    >>> fused = fusion(h, mask, torch.randn(2, 17, 48))       # (2, 7, 32)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from vlp_codebook.checks import check
from vlp_codebook.registry import MODELS

from .pretrained import load_matching, read_config, read_state_dict, resolve_architecture, strip_prefix

__all__ = ['BertTextEncoder', 'BertFusionEncoder', 'BertAttentionBlock', 'BertFusionLayer', 'extended_mask',
           'zero_absent_type_embeddings', 'checkpoint_num_layers']

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_heads=12, intermediate_size=3072,
                 max_position_embeddings=512)
CONFIG_KEYS = dict(num_heads='num_attention_heads')
PREFIXES = ('bert.', 'text_encoder.bert.', 'text_encoder.', 'model.', '0.auto_model.', 'auto_model.')


def _check_mask(name: str, mask: Optional[torch.Tensor], shape) -> None:
    if mask is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f'{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}')


def extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) 1 = attend / 0 = ignore -> additive (N, 1, 1, K) mask: 0 or the dtype's minimum.

    Non-causal: every query sees every unmasked key (the fusion layers are encoders).
    """
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class BertAttentionBlock(nn.Module):
    """Multi-head attention + output dense + dropout + residual LayerNorm (BERT post-norm, BERT's
    parameter names). ``key_width``: width of the key/value inputs (D_v for cross-attention)."""

    def __init__(self, hidden_size: int, num_heads: int, key_width: Optional[int] = None,
                 dropout: float = 0.1, layer_norm_eps: float = 1e-12):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f'hidden_size={hidden_size} is not divisible by num_heads={num_heads}')
        key_width = key_width or hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.self = nn.Module()
        self.self.query = nn.Linear(hidden_size, hidden_size)
        self.self.key = nn.Linear(key_width, hidden_size)
        self.self.value = nn.Linear(key_width, hidden_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden_size, hidden_size)
        self.output.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        # Optional ``probs -> probs`` callable on the (N, heads, L, K) attention probabilities,
        # for analysis (Grad-CAM records them here); None in training and inference.
        self.probs_hook = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, additive_mask: Optional[torch.Tensor] = None,
                keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden (N, L, D), additive_mask (N, 1, 1, K), keys (N, K, D_kv) or None (= hidden)."""
        keys = hidden if keys is None else keys
        q = self._heads(self.self.query(hidden))
        k = self._heads(self.self.key(keys))
        v = self._heads(self.self.value(keys))
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
        if additive_mask is not None:
            scores = scores + additive_mask.float()
        # fp32 softmax (max-subtracted inside softmax), then back to the compute dtype.
        probs = scores.softmax(dim=-1)
        if self.probs_hook is not None:
            probs = self.probs_hook(probs)
        probs = self.dropout(probs).to(v.dtype)
        context = (probs @ v).transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
        out = self.dropout(self.output.dense(context))
        return self.output.LayerNorm(out + hidden)


class BertFusionLayer(nn.Module):
    """One fusion layer: self-attention, cross-attention to image tokens, feed-forward."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, encoder_width: int,
                 dropout: float = 0.1, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.attention = BertAttentionBlock(hidden_size, num_heads, None, dropout, layer_norm_eps)
        self.crossattention = BertAttentionBlock(hidden_size, num_heads, encoder_width, dropout, layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden_size, intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate_size, hidden_size)
        self.output.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor,
                image_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, text_mask)
        hidden = self.crossattention(hidden, image_mask, keys=image_tokens)
        ffn = self.output.dense(nn.functional.gelu(self.intermediate.dense(hidden)))
        return self.output.LayerNorm(self.dropout(ffn) + hidden)


def _bert_sizes(pretrained, **given):
    state = read_state_dict(pretrained) if pretrained is not None else None
    ckpt_config = read_config(pretrained) if pretrained is not None else None
    # A bare state-dict file (ALBEF, BLIP) has no config.json: its tensors' shapes give the sizes.
    ckpt_sizes = ckpt_config if ckpt_config is not None or state is None else _bert_sizes_from_weights(state)
    sizes = resolve_architecture(given, ckpt_sizes, BERT_BASE, CONFIG_KEYS, pretrained,
                                 'config.json' if ckpt_config is not None else 'weights')
    if sizes.get('intermediate_size') is None:
        sizes['intermediate_size'] = 4 * sizes['hidden_size']
    if ckpt_config is not None and ckpt_config.get('hidden_act', 'gelu') != 'gelu':
        raise ValueError(f'checkpoint {pretrained!r} uses hidden_act={ckpt_config["hidden_act"]!r}; '
                         'only gelu BERT checkpoints are supported')
    return state, ckpt_config, sizes


def _bert_sizes_from_weights(state) -> dict:
    """Sizes readable off BERT weights under any prefix, as config.json keys (not the head count)."""
    def find(suffix):
        keys = sorted(k for k in state if k == suffix or k.endswith('.' + suffix))
        return state[keys[0]] if keys else None

    sizes = {}
    word, position = find('embeddings.word_embeddings.weight'), find('embeddings.position_embeddings.weight')
    if word is not None:
        sizes['vocab_size'], sizes['hidden_size'] = (int(n) for n in word.shape)
    if position is not None:
        sizes['max_position_embeddings'] = int(position.shape[0])
    ffn = find('encoder.layer.0.intermediate.dense.weight')
    if ffn is not None:
        sizes['intermediate_size'] = int(ffn.shape[0])
    return sizes


def zero_absent_type_embeddings(state):
    """BLIP's and LAVIS's BERT ("med", ``add_type_embeddings: false``) has no token-type table.
    Every token here is type 0, so a zero table reproduces that model exactly."""
    key = 'embeddings.token_type_embeddings.weight'
    word = state.get('embeddings.word_embeddings.weight')
    if key in state or word is None:
        return state
    return dict(state, **{key: word.new_zeros(2, word.shape[1])})


def checkpoint_num_layers(state, source) -> int:
    layers = {int(k.split('encoder.layer.')[1].split('.')[0]) for k in state if 'encoder.layer.' in k}
    if not layers:
        raise ValueError(f'checkpoint {source!r} has no BERT layers (no "encoder.layer.N." keys)')
    return max(layers) + 1


@MODELS.register_module()
class BertTextEncoder(nn.Module):
    """BERT embeddings + ``num_layers`` self-attention layers (no pooler).

    Args:
        vocab_size, hidden_size, num_heads, intermediate_size, max_position_embeddings: BERT-base
            by default (30522, 768, 12, 4 D, 512); sizes left ``None`` come from ``pretrained``,
            an explicit size that contradicts it raises ``ValueError``.
        num_layers: BERT layers (default 6: ALBEF's text half of BERT-base).
        pretrained: LOCAL BERT checkpoint; its embeddings and layers ``0..num_layers-1`` load.
        dropout: hidden and attention dropout (default 0.1, BERT's).

    Shapes: forward: input_ids (N, L) long, attention_mask (N, L) {0, 1} -> (N, L, D).

    Attributes: ``width`` D, ``vocab_size`` V, ``word_embeddings`` (tied by the MLM decoder).
    """

    def __init__(self, vocab_size: Optional[int] = None, hidden_size: Optional[int] = None,
                 num_layers: int = 6, num_heads: Optional[int] = None,
                 intermediate_size: Optional[int] = None, max_position_embeddings: Optional[int] = None,
                 pretrained: Optional[str] = None, dropout: float = 0.1):
        super().__init__()
        state, ckpt_config, sizes = _bert_sizes(
            pretrained, vocab_size=vocab_size, hidden_size=hidden_size, num_heads=num_heads,
            intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings)
        if num_layers < 1:
            raise ValueError(f'num_layers must be >= 1, got {num_layers}')
        # Imported here: transformers takes seconds to import, and registry lookups of unrelated
        # entries (losses, queues) import this module.
        from transformers import BertConfig, BertModel

        config = BertConfig.from_dict(dict(ckpt_config or {}))
        config.update(dict(vocab_size=sizes['vocab_size'], hidden_size=sizes['hidden_size'],
                           num_hidden_layers=num_layers, num_attention_heads=sizes['num_heads'],
                           intermediate_size=sizes['intermediate_size'],
                           max_position_embeddings=sizes['max_position_embeddings'],
                           is_decoder=False, add_cross_attention=False))
        if ckpt_config is None:
            config.update(dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
        self.bert = BertModel(config, add_pooling_layer=False)
        self.config = config
        self.width = sizes['hidden_size']
        self.vocab_size = sizes['vocab_size']
        if state is not None:
            state = zero_absent_type_embeddings(strip_prefix(state, self.bert.state_dict().keys(), PREFIXES))
            available = checkpoint_num_layers(state, pretrained)
            if num_layers > available:
                raise ValueError(f'num_layers={num_layers} but checkpoint {pretrained!r} has only '
                                 f'{available} layers')
            load_matching(self.bert, state, pretrained)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, L) token ids and (N, L) mask (1 = token, 0 = padding) -> (N, L, D) hidden states."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f'input_ids must be a (N, L) tensor, got shape {tuple(getattr(input_ids, "shape", ()))}')
        if input_ids.numel():
            # A value check: read once per step inside vlp_codebook.checks.deferred_checks.
            check(((input_ids >= 0) & (input_ids < self.vocab_size)).all(),
                  lambda: ValueError(f'input_ids must lie in [0, vocab_size={self.vocab_size}), got '
                                     f'[{int(input_ids.min())}, {int(input_ids.max())}]: tokenizer '
                                     'and encoder disagree'))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _check_mask('attention_mask', attention_mask, input_ids.shape)
        # An (N, 1, L) mask takes transformers' additive-mask path; a 2-D one first asks the
        # device whether every entry is 1 (to drop the mask for SDPA): a host read per call.
        return self.bert(input_ids=input_ids, attention_mask=attention_mask[:, None, :]).last_hidden_state


@MODELS.register_module()
class BertFusionEncoder(nn.Module):
    """BERT layers with cross-attention from text tokens to image tokens (ALBEF's fusion half).

    Args:
        hidden_size, num_layers, num_heads, intermediate_size: D (768), 6, 12, 4 D.
        encoder_width: D_v, the image-token width (default: D).
        pretrained: LOCAL BERT checkpoint; fusion layer ``i`` takes checkpoint layer
            ``pretrained_layer_offset + i`` (default offset: its last ``num_layers`` layers).
        load_cross_attention: also load ``crossattention.*`` (ALBEF checkpoints have it).
        dropout: hidden and attention dropout (default 0.1).

    Shapes: forward: text_hidden (N, L, D), attention_mask (N, L), image_tokens (N, P, D_v),
    image_mask (N, P) or None (all tokens) -> (N, L, D).
    """

    def __init__(self, hidden_size: Optional[int] = None, num_layers: int = 6, num_heads: Optional[int] = None,
                 encoder_width: Optional[int] = None, intermediate_size: Optional[int] = None,
                 pretrained: Optional[str] = None, pretrained_layer_offset: Optional[int] = None,
                 load_cross_attention: bool = False, dropout: float = 0.1):
        super().__init__()
        state, ckpt_config, sizes = _bert_sizes(pretrained, hidden_size=hidden_size, num_heads=num_heads,
                                                intermediate_size=intermediate_size)
        if num_layers < 1:
            raise ValueError(f'num_layers must be >= 1, got {num_layers}')
        eps = (ckpt_config or {}).get('layer_norm_eps', 1e-12)
        if ckpt_config is not None:
            dropout = ckpt_config.get('hidden_dropout_prob', dropout)
        self.width = sizes['hidden_size']
        self.encoder_width = encoder_width or self.width
        self.num_layers = num_layers
        self.pretrained_layer_offset = None
        self.layer = nn.ModuleList(
            BertFusionLayer(self.width, sizes['num_heads'], sizes['intermediate_size'], self.encoder_width,
                            dropout, eps) for _ in range(num_layers))
        if state is not None:
            self._load(state, pretrained, pretrained_layer_offset, load_cross_attention)

    def _load(self, state, source, offset, load_cross_attention) -> None:
        state = strip_prefix(state, [f'encoder.layer.{i}.attention.self.query.weight' for i in range(64)], PREFIXES)
        available = checkpoint_num_layers(state, source)
        if offset is None:
            offset = available - self.num_layers
        if offset < 0 or offset + self.num_layers > available:
            raise ValueError(f'pretrained_layer_offset={offset} with num_layers={self.num_layers} needs checkpoint '
                             f'layers {offset}..{offset + self.num_layers - 1}, but {source!r} has {available}')
        ours = {}
        for i in range(self.num_layers):
            prefix = f'encoder.layer.{offset + i}.'
            ours.update({f'layer.{i}.{k[len(prefix):]}': v for k, v in state.items() if k.startswith(prefix)})
        skip = () if load_cross_attention else tuple(f'layer.{i}.crossattention.' for i in range(self.num_layers))
        load_matching(self, ours, source, skip=skip)
        self.pretrained_layer_offset = offset

    def forward(self, text_hidden: torch.Tensor, attention_mask: Optional[torch.Tensor],
                image_tokens: torch.Tensor, image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fuse (N, L, D) text states with (N, P, D_v) image tokens -> (N, L, D)."""
        if text_hidden.dim() != 3 or text_hidden.shape[-1] != self.width:
            raise ValueError(f'text_hidden must be (N, L, {self.width}), got {tuple(text_hidden.shape)}')
        if (image_tokens.dim() != 3 or image_tokens.shape[-1] != self.encoder_width
                or image_tokens.shape[0] != text_hidden.shape[0]):
            raise ValueError(f'image_tokens must be (N={text_hidden.shape[0]}, P, encoder_width={self.encoder_width}), '
                             f'got {tuple(image_tokens.shape)}')
        n, length = text_hidden.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(n, length, device=text_hidden.device)
        if image_mask is None:
            image_mask = torch.ones(n, image_tokens.shape[1], device=text_hidden.device)
        _check_mask('attention_mask', attention_mask, (n, length))
        _check_mask('image_mask', image_mask, image_tokens.shape[:2])
        text_add = extended_mask(attention_mask, torch.float32)
        image_add = extended_mask(image_mask, torch.float32)
        hidden = text_hidden
        for layer in self.layer:
            hidden = layer(hidden, text_add, image_tokens, image_add)
        return hidden
