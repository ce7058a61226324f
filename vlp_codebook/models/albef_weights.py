"""ALBEF checkpoints as CODIS state dicts: start CODIS from a pretrained ALBEF.

CODIS is ALBEF's architecture plus the codebook (the paper builds on ALBEF's code), so an ALBEF
checkpoint -- the ALBEF repository's ``ALBEF_4M.pth``/``ALBEF.pth`` or a LAVIS ``albef_*`` /
``codis_*`` model's ``state_dict()`` -- initialises every part of :class:`CODIS` but the
codebook and the queues. Names map as follows (``T`` = ``text_encoder.bert.`` in the ALBEF
repository and LAVIS's pretrain model, ``text_encoder.`` in LAVIS's retrieval model; ``F`` =
the first BERT layer with cross-attention, ALBEF's ``fusion_layer``, read off the weights):

===========================================  ==============================================
ALBEF                                        CODIS
===========================================  ==============================================
``visual_encoder.*`` (timm ViT)              ``image_tower.encoder.vit.*`` (see
                                             :mod:`.encoders.timm_vit`)
``T embeddings.*``, ``T encoder.layer.i``    ``text_tower.encoder.bert.*`` (``i < F``)
``T encoder.layer.(F + j)``                  ``fusion_encoder.layer.j``
``vision_proj``, ``text_proj``               ``image_tower.proj.linear``, ``text_tower.proj.linear``
``itm_head``                                 ``itm_head.classifier``
``text_encoder.cls.predictions.*``           ``mlm_head.*`` (pretraining checkpoints)
``temp``                                     ``distillation_loss.temperature``
``visual_encoder_m``, ``vision_proj_m``,     ``image_teacher.module.*``, ``text_teacher.module.*``
``text_encoder_m`` (layers ``< F``),         (the student's copy when the checkpoint has no
``text_proj_m``                              momentum model)
``codebook_loss.codebook.*`` (LAVIS          ``codebook_loss.codebook.*``
``codis_*`` only)
===========================================  ==============================================

ALBEF's queues are not carried over (their layout and size differ; they refill within
``queue_size / batch`` steps). A BERT without token-type embeddings (LAVIS's "med" config) gets a
zero table, which is the same model since every token is type 0.

Usage::

    python -m vlp_codebook.tools.convert_albef ALBEF_4M.pth work_dirs/albef_as_codis.pth \\
        --config configs/codis_base_pretrain.py
    # then train with load_from='work_dirs/albef_as_codis.pth'

Reference: Li et al., "Align before Fuse: Vision and Language Representation Learning with
Momentum Distillation", NeurIPS 2021.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .encoders.bert import checkpoint_num_layers, zero_absent_type_embeddings
from .encoders.vit import resize_position_embeddings, vit_model_names

__all__ = ['albef_to_codis_state_dict']

_LAYER = re.compile(r'encoder\.layer\.(\d+)\.(.+)$')
_HEADS = {'vision_proj.': 'image_tower.proj.linear.', 'text_proj.': 'text_tower.proj.linear.',
          'itm_head.': 'itm_head.classifier.'}
_TEACHER_HEADS = {'vision_proj_m.': 'image_teacher.module.proj.linear.',
                  'text_proj_m.': 'text_teacher.module.proj.linear.'}


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _bert_prefix(state: Mapping[str, torch.Tensor], tower: str) -> Optional[str]:
    for prefix in (f'{tower}.bert.', f'{tower}.'):
        if f'{prefix}embeddings.word_embeddings.weight' in state:
            return prefix
    return None


def _fusion_layer(bert: Mapping[str, torch.Tensor]) -> Tuple[int, int]:
    """(F, number of layers): F = the first layer with cross-attention."""
    cross = {int(m.group(1)) for m in map(_LAYER.match, bert) if m and m.group(2).startswith('crossattention.')}
    if not cross:
        raise ValueError('the checkpoint\'s BERT has no cross-attention layers: not an ALBEF checkpoint '
                         '(expected text_encoder[.bert].encoder.layer.N.crossattention.* from the fusion layer on)')
    first = min(cross)
    if first == 0:
        raise ValueError('every BERT layer of the checkpoint has cross-attention (the BLIP layout, one encoder '
                         'for text and fusion); CODIS splits BERT into text layers and fusion layers as ALBEF')
    return first, checkpoint_num_layers(bert, 'the ALBEF checkpoint')


def _split_bert(bert: Mapping[str, torch.Tensor], fusion_layer: int, text_prefix: str,
                fusion_prefix: Optional[str]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for key, value in zero_absent_type_embeddings(bert).items():
        if key.startswith('embeddings.') and not key.endswith('position_ids'):
            out[text_prefix + key] = value
            continue
        match = _LAYER.match(key)
        if match is None:
            continue  # pooler: ALBEF's text features are the [CLS] hidden state
        index, rest = int(match.group(1)), match.group(2)
        if index < fusion_layer:
            out[f'{text_prefix}encoder.layer.{index}.{rest}'] = value
        elif fusion_prefix is not None:
            out[f'{fusion_prefix}layer.{index - fusion_layer}.{rest}'] = value
    return out


def _vit(state: Mapping[str, torch.Tensor], prefix: str, target: str,
         num_patches: Optional[int]) -> Dict[str, torch.Tensor]:
    vit = vit_model_names(_under(state, prefix))
    pos = vit.get('embeddings.position_embeddings')
    if num_patches is not None and pos is not None and pos.shape[1] != 1 + num_patches:
        vit['embeddings.position_embeddings'] = resize_position_embeddings(pos, num_patches)
    return {target + k: v for k, v in vit.items()}


def albef_to_codis_state_dict(state: Mapping[str, torch.Tensor], image_size: Optional[int] = None,
                              patch_size: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename an ALBEF state dict to CODIS's parameter names (table in the module docstring).

    Args:
        state: the ALBEF checkpoint's tensors (unwrapped from ``{'model': ...}``).
        image_size, patch_size: the CODIS image encoder's; when both are given and the
            checkpoint's position grid differs (ALBEF pretrains at 256 px, fine-tunes at 384),
            it is resized bicubically, as ALBEF's ``interpolate_pos_embed``.

    Returns:
        ``(codis_state, notes)``: the renamed tensors, and one line per part that was not in the
        checkpoint and was derived instead (teachers copied from the students, zero token-type
        table) -- for the converter's log.

    Raises:
        ValueError: not an ALBEF layout (no ``visual_encoder.``, no BERT, no fusion layers,
            BLIP's single text/fusion encoder).
    """
    notes: List[str] = []
    if not any(k.startswith('visual_encoder.') for k in state):
        raise ValueError(f'no visual_encoder.* weights: not an ALBEF checkpoint (it has e.g. {sorted(state)[:5]})')
    text_prefix = _bert_prefix(state, 'text_encoder')
    if text_prefix is None:
        raise ValueError('no text_encoder[.bert].embeddings.word_embeddings.weight: not an ALBEF checkpoint')
    bert = _under(state, text_prefix)
    fusion_layer, num_layers = _fusion_layer(bert)
    num_patches = (image_size // patch_size) ** 2 if image_size and patch_size else None

    out = _vit(state, 'visual_encoder.', 'image_tower.encoder.vit.', num_patches)
    out.update(_split_bert(bert, fusion_layer, 'text_tower.encoder.bert.', 'fusion_encoder.'))
    if 'embeddings.token_type_embeddings.weight' not in bert:
        notes.append('token-type embeddings: zeros (the checkpoint\'s BERT has none)')
    for source, target in _HEADS.items():
        out.update({target + k: v for k, v in _under(state, source).items()})
    mlm = _under(state, 'text_encoder.cls.predictions.')
    if mlm:
        # transformers ties decoder.bias to predictions.bias; CODIS keeps the one ``bias``.
        out.update({'mlm_head.' + k: v for k, v in mlm.items() if k != 'decoder.bias'})
    else:
        notes.append('MLM head: not in the checkpoint (a retrieval model); trained from scratch')
    if 'temp' in state:
        out['distillation_loss.temperature'] = state['temp'].reshape(())
    out.update({k: v for k, v in state.items() if k.startswith('codebook_loss.codebook.')})

    momentum_prefix = _bert_prefix(state, 'text_encoder_m')
    if any(k.startswith('visual_encoder_m.') for k in state) and momentum_prefix is not None:
        out.update(_vit(state, 'visual_encoder_m.', 'image_teacher.module.encoder.vit.', num_patches))
        out.update(_split_bert(_under(state, momentum_prefix), fusion_layer,
                               'text_teacher.module.encoder.bert.', None))
        for source, target in _TEACHER_HEADS.items():
            out.update({target + k: v for k, v in _under(state, source).items()})
    else:
        notes.append('momentum teachers: copies of the students (no *_m weights in the checkpoint)')
        for key in list(out):
            for student, teacher in (('image_tower.', 'image_teacher.module.'), ('text_tower.', 'text_teacher.module.')):
                if key.startswith(student):
                    out[teacher + key[len(student):]] = out[key]
    notes.insert(0, f'BERT: {fusion_layer} text layers + {num_layers - fusion_layer} fusion layers')
    return out, notes
