r"""Masked language modelling (MLM) conditioned on the image, as BERT / ALBEF.

:func:`mask_tokens` (Devlin et al. 2019) selects every real, non-special token with probability
``mask_prob`` (15 %) and makes it ``[MASK]`` (80 %), a random non-special token (10 %) or leaves
it (10 %); labels are the original ids there and -100 elsewhere. The head is BERT's transform and
a vocabulary decoder, tied to the word embeddings by ``tie_to``; it reads the fused states of the
masked text. The loss is the mean of :math:`-\log \mathrm{softmax}(\text{logits})_{y}` over the
selected positions, log-softmax in fp32.

Example::

    >>> import torch
    >>> from vlp_codebook.models.heads.mlm import mask_tokens
    >>> from vlp_codebook.registry import MODELS
    >>> ids = torch.randint(5, 100, (4, 12)); mask = torch.ones_like(ids)
    >>> masked_ids, labels = mask_tokens(ids, mask, vocab_size=100, mask_token_id=4,
    ...                                  special_token_ids=[0, 1, 2, 3, 4])
    >>> head = MODELS.build(dict(type='MaskedLanguageModelingHead', hidden_size=32, vocab_size=100))
    >>> hidden = torch.randn(4, 12, 32)                     # fused states of the masked text
    >>> selected = labels != -100                           # score only the selected positions
    >>> loss = MODELS.build(dict(type='MaskedLanguageModelingLoss'))(head(hidden[selected]), labels[selected])
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from vlp_codebook import dist
from vlp_codebook.checks import check
from vlp_codebook.registry import MODELS

__all__ = ['mask_tokens', 'MaskedLanguageModelingHead', 'MaskedLanguageModelingLoss', 'IGNORE_INDEX']

IGNORE_INDEX = -100


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int, mask_token_id: int,
                special_token_ids: Iterable[int], mask_prob: float = 0.15,
                generator: Optional[torch.Generator] = None, replace_prob: float = 0.8,
                random_prob: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a padded batch; the input is not modified.

    Args:
        input_ids: (N, L) long token ids.
        attention_mask: (N, L), 1 = real token, 0 = padding.
        vocab_size: V; random replacements are drawn from ``[0, V)`` minus the special ids.
        mask_token_id: id of ``[MASK]``.
        special_token_ids: ids never selected ([CLS], [SEP], [PAD], [MASK], [UNK]...).
        mask_prob: selection probability of an eligible token (0.15).
        generator: makes the masking reproducible; random numbers are drawn on its device.
        replace_prob, random_prob: shares of selected tokens that become [MASK] / a random
            token (0.8 / 0.1); the rest (0.1) stay unchanged.

    Returns:
        masked_ids (N, L) long, labels (N, L) long: original id where selected, -100 elsewhere.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f'input_ids and attention_mask must be (N, L) of equal shape, got '
                         f'{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}')
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f'mask_prob must be in [0, 1], got {mask_prob}')
    if not (0.0 <= replace_prob and 0.0 <= random_prob and replace_prob + random_prob <= 1.0):
        raise ValueError(f'replace_prob={replace_prob} and random_prob={random_prob} must be >= 0 and sum to <= 1')
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f'mask_token_id={mask_token_id} is outside the vocabulary [0, {vocab_size})')
    device = input_ids.device
    special_ids = sorted(set(int(i) for i in special_token_ids))
    special = torch.tensor(special_ids, dtype=torch.long, device=device)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)
    # Replacement candidates from the Python ids, on the host: no read of a device tensor.
    candidates = torch.ones(vocab_size, dtype=torch.bool)
    candidates[[i for i in special_ids if 0 <= i < vocab_size]] = False
    candidates = candidates.nonzero().squeeze(1)
    if len(candidates) == 0:
        raise ValueError('every vocabulary id is special: no token to use as a random replacement')

    draw_device = generator.device if generator is not None else device
    shape = input_ids.shape
    u_select = torch.rand(shape, generator=generator, device=draw_device).to(device)
    u_kind = torch.rand(shape, generator=generator, device=draw_device).to(device)
    random_pick = torch.randint(len(candidates), shape, generator=generator, device=draw_device)
    random_tokens = candidates.to(draw_device)[random_pick].to(device)

    selected = eligible & (u_select < mask_prob)
    to_mask = selected & (u_kind < replace_prob)
    to_random = selected & (u_kind >= replace_prob) & (u_kind < replace_prob + random_prob)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_tokens[to_random]
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


@MODELS.register_module()
class MaskedLanguageModelingHead(nn.Module):
    """BERT's MLM head: dense + GELU + LayerNorm, then a decoder to the vocabulary (+ bias).

    Args:
        hidden_size: D.
        vocab_size: V.
        tie_to: an ``nn.Embedding`` (or any module with a (V, D) ``weight``), e.g.
            ``text_encoder.word_embeddings``: the decoder shares that weight (BERT/ALBEF).
        layer_norm_eps: LayerNorm epsilon.
        pretrained: LOCAL checkpoint of a BERT masked-LM (``BertForMaskedLM``, as ALBEF starts
            from): loads ``cls.predictions.transform.*`` and ``cls.predictions.bias`` (and the
            decoder weight when the head is not tied).

    Shapes:
        forward: (..., D) -> (..., V) logits.
    """

    def __init__(self, hidden_size: int, vocab_size: int, tie_to: Optional[nn.Module] = None,
                 layer_norm_eps: float = 1e-12, pretrained: Optional[str] = None):
        super().__init__()
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(hidden_size, hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        if tie_to is not None:
            weight = getattr(tie_to, 'weight', None)
            if not isinstance(weight, nn.Parameter) or tuple(weight.shape) != (vocab_size, hidden_size):
                raise ValueError(f'tie_to must have a (vocab_size={vocab_size}, hidden_size={hidden_size}) weight '
                                 f'parameter, got {tuple(getattr(weight, "shape", ()))}')
            self.decoder.weight = weight
        self.tied = tie_to is not None
        if pretrained is not None:
            self._load(pretrained)

    def _load(self, path: str) -> None:
        from vlp_codebook.models.encoders.pretrained import load_matching, read_state_dict, strip_prefix

        expected = [k for k in self.state_dict() if not (self.tied and k.startswith('decoder.'))]
        state = strip_prefix(read_state_dict(path), expected, ('cls.predictions.',))
        if not self.tied and 'decoder.weight' not in state:
            raise ValueError(f'checkpoint {path!r} has no untied MLM decoder weight (BERT ties it to the word '
                             'embeddings): build the head with tie_to=text_encoder.word_embeddings')
        load_matching(self, state, path, skip=('decoder.',) if self.tied else ())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f'hidden must end in hidden_size={self.hidden_size}, got {tuple(hidden.shape)}')
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(hidden)))
        return self.decoder(x) + self.bias


@MODELS.register_module()
class MaskedLanguageModelingLoss(nn.Module):
    """Cross-entropy at the selected positions (labels != -100), fp32 log-softmax.

    Args:
        loss_weight: multiplies the loss.

    Returns of forward: ``{'loss_mlm': scalar fp32}``; 0 (still attached to the graph) when no
    position is selected, so every rank runs the same backward under DDP.
    """

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """logits (..., V), labels (...) long with -100 at ignored positions."""
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f'logits (..., V) and labels (...) disagree: {tuple(logits.shape)} vs '
                             f'{tuple(labels.shape)}')
        logits = logits.reshape(-1, logits.shape[-1]).float()
        labels = labels.reshape(-1)
        vocab = logits.shape[-1]
        selected = labels != IGNORE_INDEX
        bad = selected & ((labels < 0) | (labels >= vocab))
        check(~bad.any(), lambda: ValueError(f'labels must be -100 or in [0, {vocab}), got '
                                             f'{labels[bad][:5].tolist()}'))
        # No branch on the number of selected positions (a host read): every row is scored and
        # the unselected ones are masked out; none selected gives 0, still attached to the graph.
        nll = -F.log_softmax(logits, dim=-1).gather(1, labels.clamp(0, vocab - 1)[:, None])[:, 0]
        count = selected.sum()
        loss = torch.where(selected, nll, 0.0).sum() / count.clamp_min(1)
        # A mean over this rank's masked tokens, weighted so that DDP's average of the gradients
        # is the joint batch's mean over all masked tokens (dist.batch_weight).
        weight = dist.batch_weight(count, logits.device)
        return {'loss_mlm': loss * (self.loss_weight * weight)}
