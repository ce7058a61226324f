r"""CODIS: the full pretraining model, assembled from registry entries.

.. math::
    L = L_{code} + L_{align} + L_{itm} + L_{mlm}

(Duan et al., "Multi-modal Alignment using Representation Codebook", CVPR 2022, "Part 3").
The architecture is ALBEF's (Li et al., NeurIPS 2021): an image encoder and a text encoder
with projections into a shared space (:mod:`vlp_codebook.models.towers`), a fusion encoder
with cross-attention for ITM and MLM, and a momentum teacher of each tower with a queue of
its past embeddings. Every piece is a config dict built from
:data:`vlp_codebook.registry.MODELS`; setting an objective's config to ``None`` (or its
``loss_weight`` to 0) does not build it, so the ablation rows of the paper are configs:

=====================================  ===========================================================
paper row                              config
=====================================  ===========================================================
a: MLM+ITM+ITC (cross align)           ``distillation_loss.directions=('t2i','i2t')``, ``codebook_loss=None``
b: MLM+ITM+ITC (intra + cross)         all four directions, ``codebook_loss=None``
a + codebook (teacher feature)         a, plus ``codebook_loss``
b + codebook (student feature)         b, plus ``codebook_loss``, ``codebook_plan_features='student'``
b + codebook (teacher feature)         the default (full CODIS)
=====================================  ===========================================================

``forward(mode='loss')`` returns every term by name (``loss_code_*``, ``loss_t2i``...,
``loss_itm``, ``loss_mlm``) plus logged statistics without "loss" in their names (``temperature``,
``alpha``, ``code_perplexity``, ``code_plan_perplexity``), which mmengine logs but does not sum.
``mode='predict'`` returns per-image embeddings for
:class:`~vlp_codebook.evaluation.RetrievalMetric`; ``mode='tensor'`` the raw embeddings.

The momentum teachers are updated inside every training forward, before the teacher pass (as
ALBEF), and the queues are filled after the losses. All value checks of a step are read from the
device once, at its end (:func:`vlp_codebook.checks.deferred_checks`; ``tests/test_host_reads.py``).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Union

import torch
from mmengine.model import BaseModel
from torch import nn

from vlp_codebook import dist
from vlp_codebook.checks import deferred_checks
from vlp_codebook.models.heads.itm import itm_score
from vlp_codebook.models.host_counters import HostCounters
from vlp_codebook.models.losses.functional import ramped_alpha
from vlp_codebook.models.heads.mlm import mask_tokens
from vlp_codebook.models.towers import ImageTower, TextTower, build_module
from vlp_codebook.registry import MODELS

__all__ = ['CODIS']

ConfigType = Union[None, Mapping, nn.Module]


def _check_options(codebook_plan_features, queue_size, itm_negatives) -> None:
    # alpha and alpha_warmup_iters are checked where they are used (the distillation loss, ramped_alpha).
    if codebook_plan_features not in ('teacher', 'student'):
        raise ValueError("codebook_plan_features must be 'teacher' or 'student', got "
                         f'{codebook_plan_features!r}')
    if queue_size < 0:
        raise ValueError(f'queue_size must be >= 0, got {queue_size}')
    if itm_negatives not in ('in_rank', 'all_ranks'):
        raise ValueError(f"itm_negatives must be 'in_rank' (ALBEF) or 'all_ranks' (BLIP), got "
                         f'{itm_negatives!r}')


def _enabled(cfg: ConfigType) -> bool:
    """An objective is built unless its config is None or its loss_weight is 0."""
    if cfg is None:
        return False
    if isinstance(cfg, Mapping):
        return float(cfg.get('loss_weight', 1.0)) != 0.0
    return True


@MODELS.register_module()
class CODIS(HostCounters, BaseModel):
    """CODIS vision-language pretraining model.

    Args:
        image_encoder, text_encoder, fusion_encoder: encoder configs (``ViTImageEncoder``,
            ``BertTextEncoder``, ``BertFusionEncoder``; the fusion encoder is needed by ITM/MLM).
        embed_dim: dimension of the shared embedding space (paper: 256).
        data_preprocessor: ``VLPDataPreprocessor`` config (tokeniser, image normalisation).
        teacher: ``MomentumTeacher`` config without ``student``.
        queue_size: past teacher embeddings kept per modality (paper: 65536); 0: no queue.
        distillation_loss, codebook_loss, itm_loss, mlm_loss: loss configs, or None.
        codebook_plan_features: ``'teacher'`` (paper's best) or ``'student'``: the embeddings the
            codebook's transport plans are computed from.
        itm_head, mlm_head: head configs (sizes filled in; the MLM decoder is tied to the text
            encoder's word embeddings).
        mask_prob: MLM masking probability (15 %, of which 80/10/10 mask/random/keep).
        alpha, alpha_warmup_iters: momentum-distillation weight α (ALBEF 0.4), ramped linearly
            from 0 over this many steps (ALBEF: one epoch; 0: no ramp).
        itm_temperature: temperature of the similarities ITM negatives are drawn from when there
            is no distillation loss (else its learnable γ).
        itm_negatives: ``'in_rank'`` (ALBEF: hard negatives from this rank's batch, default) or
            ``'all_ranks'`` (BLIP's ``negative_all_rank``: from the joint batch, gathered with
            gradient; the same in one process).
        log_joint_batch_means: under torch.distributed, log every loss term's joint-batch value
            (one all-reduce per step) rather than rank 0's (mmengine's default); the
            back-propagated loss stays this rank's share.
        init_cfg: mmengine init config.
    """

    def __init__(self,
                 image_encoder: ConfigType,
                 text_encoder: ConfigType,
                 fusion_encoder: ConfigType = None,
                 embed_dim: int = 256,
                 data_preprocessor: Optional[Mapping] = None,
                 teacher: Mapping = dict(type='MomentumTeacher', momentum=0.995),
                 queue_size: int = 65536,
                 distillation_loss: ConfigType = dict(type='MultiDirectionalDistillationLoss'),
                 codebook_loss: ConfigType = dict(type='CodebookOTLoss'),
                 codebook_plan_features: str = 'teacher',
                 itm_loss: ConfigType = dict(type='ImageTextMatchingLoss'),
                 itm_head: ConfigType = dict(type='ImageTextMatchingHead'),
                 mlm_loss: ConfigType = dict(type='MaskedLanguageModelingLoss'),
                 mlm_head: ConfigType = dict(type='MaskedLanguageModelingHead'),
                 mask_prob: float = 0.15,
                 alpha: float = 0.4,
                 alpha_warmup_iters: int = 0,
                 itm_temperature: float = 0.07,
                 itm_negatives: str = 'in_rank',
                 log_joint_batch_means: bool = True,
                 init_cfg: Optional[Mapping] = None):
        if isinstance(data_preprocessor, Mapping):
            data_preprocessor = MODELS.build(dict(data_preprocessor))
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        _check_options(codebook_plan_features, queue_size, itm_negatives)
        self.embed_dim = embed_dim
        self.log_joint_batch_means = log_joint_batch_means
        self._local_batch_size = 0  # of the last loss-mode forward, for parse_losses
        self._build_towers(image_encoder, text_encoder, teacher, queue_size)
        self.distillation_loss = build_module(distillation_loss, 'distillation_loss') if _enabled(distillation_loss) else None
        self.codebook_loss = (build_module(codebook_loss, 'codebook_loss', embed_dim=embed_dim)
                              if _enabled(codebook_loss) else None)
        self.codebook_plan_features = codebook_plan_features
        self._build_fusion(fusion_encoder, itm_loss, itm_head, mlm_loss, mlm_head)
        self.mask_prob = mask_prob
        self.alpha = float(alpha)
        self.alpha_warmup_iters = int(alpha_warmup_iters)
        self.itm_temperature = float(itm_temperature)
        self.itm_negatives = itm_negatives
        # Training steps taken, for the α ramp; a buffer so that resuming continues the ramp.
        self.register_counter('num_steps')
        # Ids handed to pairs that come without one: negative (dataset ids are >= 0) and never
        # reused, so queued entries of earlier steps are not mistaken for positives.
        self.register_counter('num_anonymous_ids')

    def _build_towers(self, image_encoder, text_encoder, teacher, queue_size: int) -> None:
        """Student towers, their momentum teachers and the teachers' feature queues."""
        if isinstance(text_encoder, Mapping) and text_encoder.get('vocab_size', 0) is None:
            # The text encoder's vocabulary is the tokenizer's.
            vocab_size = getattr(self.data_preprocessor, 'vocab_size', None)
            if vocab_size is None:
                raise ValueError('text_encoder.vocab_size=None needs a data_preprocessor with a tokenizer')
            text_encoder = dict(text_encoder, vocab_size=vocab_size)
        self.image_tower = ImageTower(image_encoder, self.embed_dim)
        self.text_tower = TextTower(text_encoder, self.embed_dim)
        self.image_teacher = build_module(teacher, 'teacher', student=self.image_tower)
        self.text_teacher = build_module(teacher, 'teacher', student=self.text_tower)
        self.queue_size = queue_size
        self.image_queue = self.text_queue = None
        if queue_size > 0:
            queue = dict(type='FeatureQueue', size=queue_size, dim=self.embed_dim, with_ids=True)
            self.image_queue, self.text_queue = MODELS.build(queue), MODELS.build(queue)

    def _build_fusion(self, fusion_encoder, itm_loss, itm_head, mlm_loss, mlm_head) -> None:
        """The fusion encoder and the ITM / MLM heads and losses (none without ITM and MLM)."""
        needs_fusion = _enabled(itm_loss) or _enabled(mlm_loss)
        if needs_fusion and fusion_encoder is None:
            raise ValueError('itm_loss / mlm_loss need a fusion_encoder config; set them to None '
                             'to train without ITM and MLM')
        self.fusion_encoder = build_module(fusion_encoder, 'fusion_encoder') if needs_fusion else None
        text_width = self.text_tower.encoder.width
        self.itm_loss = build_module(itm_loss, 'itm_loss') if _enabled(itm_loss) else None
        self.itm_head = build_module(itm_head, 'itm_head', hidden_size=text_width) if self.itm_loss is not None else None
        self.mlm_loss = build_module(mlm_loss, 'mlm_loss') if _enabled(mlm_loss) else None
        self.mlm_head = (build_module(mlm_head, 'mlm_head', hidden_size=text_width,
                                      vocab_size=self.text_tower.encoder.vocab_size,
                                      tie_to=self.text_tower.encoder.word_embeddings)
                         if self.mlm_loss is not None else None)

    def init_weights(self):
        super().init_weights()
        # Teachers start as exact copies of the (possibly re-initialised) students, as ALBEF's copy_params.
        self.image_teacher.reset()
        self.text_teacher.reset()

    # ------------------------------------------------------------------ helpers
    def current_alpha(self) -> float:
        """α of the momentum-distillation targets, ramped over ``alpha_warmup_iters`` steps."""
        return ramped_alpha(self.alpha, self.counter('num_steps'), self.alpha_warmup_iters)

    def _anonymous_ids(self, batch: int, device: torch.device) -> torch.Tensor:
        """Fresh ids -1, -2, ... for a batch without ids, unique across steps and ranks."""
        start = dist.local_slice(batch, device=device).start
        joint = sum(dist.batch_sizes(batch, device))
        base = self.counter('num_anonymous_ids')
        if self.training:
            self.set_counter('num_anonymous_ids', base + joint)
        return -(base + start + torch.arange(batch, device=device) + 1)

    def temperature(self) -> torch.Tensor:
        if self.distillation_loss is not None:
            return self.distillation_loss.temperature.detach().float()
        return torch.tensor(self.itm_temperature)

    def extract_feats(self, images: Optional[torch.Tensor] = None,
                      input_ids: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Student embeddings (unit norm, fp32) and token states of whatever is given."""
        out = {}
        if images is not None:
            out['image_tokens'], out['image_embeds'] = self.image_tower(images)
        if input_ids is not None:
            out['text_hidden'], out['text_embeds'] = self.text_tower(input_ids, attention_mask)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor = None, input_ids: torch.Tensor = None,
                attention_mask: torch.Tensor = None, image_ids: Optional[torch.Tensor] = None,
                data_samples: Optional[list] = None, mode: str = 'tensor', **kwargs):
        """mmengine entry point; the data preprocessor's output dict is passed as keywords.

        Args: images (N, 3, H, W); input_ids, attention_mask (M, L) (M = N in training);
        image_ids (N,) >= 0, shared by captions of one image (without: every pair its own
        instance); mode ``'loss'`` | ``'predict'`` | ``'tensor'``; kwargs: ``text_to_image`` (M,)
        for predict mode, each caption's row of ``images``.
        """
        if mode == 'loss':
            return self.loss(images, input_ids, attention_mask, image_ids)
        if mode == 'predict':
            return self.predict(images, input_ids, attention_mask, image_ids,
                                kwargs.get('text_to_image'), data_samples)
        if mode == 'tensor':
            return self.extract_feats(images, input_ids, attention_mask)
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")

    def loss(self, images, input_ids, attention_mask, image_ids=None) -> Dict[str, torch.Tensor]:
        """Every loss term and the logged statistics of one step (see the class docstring). The
        value checks of all components are read once, at the end."""
        with deferred_checks():
            return self._loss(images, input_ids, attention_mask, image_ids)

    def _loss(self, images, input_ids, attention_mask, image_ids=None) -> Dict[str, torch.Tensor]:
        if images is None or input_ids is None:
            raise ValueError('loss mode needs images and input_ids')
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(f'loss mode needs one caption per image: images has {images.shape[0]} '
                             f'rows, input_ids {input_ids.shape[0]}')
        self._local_batch_size = images.shape[0]
        if image_ids is None:
            image_ids = self._anonymous_ids(images.shape[0], images.device)
        image_ids = image_ids.to(images.device)
        image_tokens, zv = self.image_tower(images)
        text_hidden, zt = self.text_tower(input_ids, attention_mask)
        with torch.no_grad():
            if self.training:
                self.image_teacher.update()
                self.text_teacher.update()
            zv_m = self.image_teacher(images)[1]
            zt_m = self.text_teacher(input_ids, attention_mask)[1]

        losses: Dict[str, torch.Tensor] = {}
        alpha = self.current_alpha()
        if self.distillation_loss is not None:
            losses.update(self.distillation_loss(
                image_feats=zv, text_feats=zt, image_teacher_feats=zv_m, text_teacher_feats=zt_m,
                image_queue=self.image_queue, text_queue=self.text_queue, image_ids=image_ids,
                alpha=alpha))
        if self.codebook_loss is not None:
            teacher_plans = self.codebook_plan_features == 'teacher'
            code = self.codebook_loss(zv, zt, zv_m if teacher_plans else None,
                                      zt_m if teacher_plans else None)
            losses.update({'loss_code_' + k[len('loss_'):]: v for k, v in code.items()})
        if self.itm_loss is not None:
            with torch.no_grad():
                # Hard negatives are drawn from the student similarities to this rank's batch
                # (ALBEF) or to the joint batch (BLIP's negative_all_rank).
                temp = self.temperature().to(zv.device)
                all_ranks = self.itm_negatives == 'all_ranks'
                keys_t = dist.gather_no_grad(zt) if all_ranks else zt
                keys_v = dist.gather_no_grad(zv) if all_ranks else zv
                sim_i2t = zv @ keys_t.T / temp
                sim_t2i = zt @ keys_v.T / temp
            losses.update(self.itm_loss(self.fusion_encoder, self.itm_head, text_hidden,
                                        attention_mask, image_tokens, sim_i2t, sim_t2i, ids=image_ids))
        if self.mlm_loss is not None:
            losses.update(self._mlm(input_ids, attention_mask, image_tokens))

        if self.training:
            if self.image_queue is not None:
                self.image_queue.enqueue(zv_m, ids=image_ids)
                self.text_queue.enqueue(zt_m, ids=image_ids)
            self.set_counter('num_steps', self.counter('num_steps') + 1)
        losses['alpha'] = torch.tensor(alpha)
        losses['temperature'] = self.temperature()
        if self.codebook_loss is not None:
            for name in ('code_perplexity', 'code_plan_perplexity'):
                if name in self.codebook_loss.last_stats:
                    losses[name] = torch.as_tensor(self.codebook_loss.last_stats[name], dtype=torch.float32)
        return losses

    def parse_losses(self, losses: Dict[str, torch.Tensor]):
        """mmengine's sum of the ``loss*`` terms (back-propagated, this rank's), and the logged
        values: joint-batch means under torch.distributed (see ``log_joint_batch_means``)."""
        loss, log_vars = super().parse_losses(losses)
        if self.log_joint_batch_means and self._local_batch_size > 0:
            # Every loss is already weighted by dist.batch_weight (its rank-local mean times
            # B_r * world / B): the plain mean over ranks is the joint-batch value.
            log_vars = dist.joint_batch_mean(log_vars, 1)
        return loss, log_vars

    def _mlm(self, input_ids, attention_mask, image_tokens) -> Dict[str, torch.Tensor]:
        preprocessor = self.data_preprocessor
        if getattr(preprocessor, 'mask_token_id', None) is None:
            raise RuntimeError('MLM needs a data preprocessor with a tokenizer that has a [MASK] token '
                               f'(VLPDataPreprocessor); got {type(preprocessor).__name__}')
        masked_ids, labels = mask_tokens(
            input_ids, attention_mask, vocab_size=self.text_tower.encoder.vocab_size,
            mask_token_id=preprocessor.mask_token_id,
            special_token_ids=preprocessor.special_token_ids, mask_prob=self.mask_prob)
        hidden = self.text_tower.encoder(masked_ids, attention_mask)
        fused = self.fusion_encoder(hidden, attention_mask, image_tokens)
        # The vocabulary-wide head only on the selected positions: same loss, far less work.
        selected = labels != -100
        return self.mlm_loss(self.mlm_head(fused[selected]), labels[selected])

    @torch.no_grad()
    def predict(self, images, input_ids, attention_mask, image_ids=None, text_to_image=None,
                data_samples=None) -> List[dict]:
        """Embeddings for retrieval: one dict per image with ``image_embed`` (d,),
        ``text_embeds`` (n_captions, d) and ``image_id``."""
        if text_to_image is None:
            if input_ids is not None and input_ids.shape[0] != images.shape[0]:
                raise ValueError('predict mode needs text_to_image when images and captions differ in number')
            text_to_image = torch.arange(images.shape[0], device=images.device)
        feats = self.extract_feats(images, input_ids, attention_mask)
        if image_ids is None:
            image_ids = torch.arange(images.shape[0])
        text_to_image = text_to_image.to(feats['image_embeds'].device)
        outputs = []
        for i in range(images.shape[0]):
            rows = (text_to_image == i).nonzero().squeeze(1)
            outputs.append(dict(image_embed=feats['image_embeds'][i].cpu(),
                                text_embeds=feats['text_embeds'][rows].cpu(),
                                image_id=int(image_ids[i])))
        return outputs

    @torch.no_grad()
    def itm_scores(self, images: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """(N,) positive-class ITM logits of N (image, caption) pairs, for re-ranking."""
        if self.itm_head is None:
            raise RuntimeError('this CODIS model was built without ITM (itm_loss=None)')
        image_tokens, _ = self.image_tower(images)
        text_hidden, _ = self.text_tower(input_ids, attention_mask)
        return itm_score(self.fusion_encoder, self.itm_head, text_hidden, attention_mask, image_tokens)
