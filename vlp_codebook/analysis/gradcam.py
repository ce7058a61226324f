r"""Grad-CAM of the ITM score on the cross-attention maps, per text token (the paper's figure
"Grad-CAM visualization on the cross-attention maps corresponding to individual words").

For a fusion layer :math:`\ell`, let :math:`A \in [0, 1]^{H \times L \times (1 + P)}` be its
cross-attention probabilities (heads x text tokens x image tokens, [CLS] image token first) and
:math:`s` the positive-class logit of the image-text matching head. The map of text token
:math:`l` over the :math:`P` image patches is

.. math::  \mathrm{CAM}_{l, j} = \frac{1}{H} \sum_h A_{h, l, j}\, \max\Big(0, \frac{\partial s}{\partial A_{h, l, j}}\Big),
           \qquad j = 1 \dots P,

reshaped to the patch grid (Selvaraju et al., "Grad-CAM", ICCV 2017, applied to attention as in
ALBEF's visualisation, which uses BERT layer 8: the third of the six fusion layers). Row 0 is the
text [CLS] token, i.e. the whole caption.

The ITM head reads the [CLS] output of the last fusion layer only, so a word's map can be
non-zero only when later fusion layers carry that word into [CLS]: in the last layer every
word's map is exactly zero. Hence the default layer is never the last one when there are two
or more.

Example::

    >>> cams, itm_logit = itm_gradcam(model, images, input_ids, attention_mask)
    >>> cams.shape        # (N, L, H / patch, W / patch)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ['itm_gradcam', 'default_layer']


def default_layer(num_layers: int) -> int:
    """The third fusion layer (ALBEF's, of six), else the last but one, else the only one."""
    return min(2, max(0, num_layers - 2))


def itm_gradcam(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                layer: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token Grad-CAM maps of the ITM positive logit for N (image, caption) pairs.

    ``model``: a CODIS (or any model with ``image_tower``, ``text_tower``, ``fusion_encoder`` and
    ``itm_head``); ``images`` (N, 3, H, W) as the data preprocessor gives them; ``input_ids``,
    ``attention_mask`` (N, L); ``layer`` default :func:`default_layer`. Returns ``(cams,
    itm_logit)``: (N, L, H/p, W/p) non-negative maps (padding rows zero) and the (N,) logits. No
    parameter gradient is accumulated, and the model's train/eval mode is restored.
    """
    for name in ('image_tower', 'text_tower', 'fusion_encoder', 'itm_head'):
        if getattr(model, name, None) is None:
            raise RuntimeError(f'itm_gradcam needs a model with {name} (a CODIS config whose itm_loss is not None)')
    layers = model.fusion_encoder.layer
    layer = default_layer(len(layers)) if layer is None else layer
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f'layer={layer} but the fusion encoder has {len(layers)} layers')
    if images.dim() != 4 or input_ids.shape != attention_mask.shape or input_ids.shape[0] != images.shape[0]:
        raise ValueError(f'need images (N, 3, H, W) and input_ids/attention_mask (N, L), got '
                         f'{tuple(images.shape)}, {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}')
    block = layers[layer].crossattention
    recorded = []

    def record(probs: torch.Tensor) -> torch.Tensor:
        # A leaf that requires grad: the gradient is taken with respect to the probabilities
        # themselves, also when the model's parameters are frozen.
        leaf = probs.detach().requires_grad_()
        recorded.append(leaf)
        return leaf

    was_training = model.training
    model.eval()
    block.probs_hook = record
    try:
        with torch.no_grad():
            image_tokens, _ = model.image_tower(images)
            text_hidden, _ = model.text_tower(input_ids, attention_mask)
        with torch.enable_grad():
            logit = model.itm_head(model.fusion_encoder(text_hidden, attention_mask, image_tokens))[:, 1].float()
            probs = recorded[-1]
            grads, = torch.autograd.grad(logit.sum(), probs)
    finally:
        block.probs_hook = None
        model.train(was_training)
    cams = (probs.detach().float() * grads.float().clamp(min=0)).mean(dim=1)[:, :, 1:]    # drop image [CLS]
    cams = cams * attention_mask[:, :, None].to(cams.dtype)
    patch = model.image_tower.encoder.patch_size
    height, width = images.shape[-2] // patch, images.shape[-1] // patch
    return cams.reshape(cams.shape[0], cams.shape[1], height, width), logit.detach()
