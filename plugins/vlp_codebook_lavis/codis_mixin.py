r"""Adds the CODIS terms to a LAVIS ALBEF/BLIP model without re-implementing its forward.

LAVIS's ``forward`` returns its encoder outputs in ``output.intermediate_output``; the mixin
re-applies LAVIS's projections to the same [CLS] embeddings, which gives exactly LAVIS's
``image_feat``, ``text_feat``, ``image_feat_m``, ``text_feat_m``. Then:

* the codebook terms :math:`L_{code}` (registry ``CodebookOTLoss``; plans from the momentum
  features by default, ``plan_features: student`` is the ablation);
* optionally the intra-modal terms :math:`L_{i2i}, L_{t2t}` (``MultiDirectionalDistillationLoss``
  with LAVIS's learnable ``temp`` and ramped ``alpha``). LAVIS already pushed this batch into its
  own queues, so these use the mixin's own ``FeatureQueue`` pair, read before and filled after
  the loss. The cross directions are LAVIS's own ITC and are not computed twice.

Model-config blocks (under ``model:`` in a LAVIS YAML)::

    codebook_loss:              # any CodebookOTLoss argument, plus:
      type: CodebookOTLoss      # registry name (swap for an ablation)
      plan_features: teacher    # teacher | student
      num_codewords: 1024
    intra_modal_loss:           # absent or null: off
      queue_size: 4096          # default: the model's queue_size
      directions: [i2i, t2t]    # any MultiDirectionalDistillationLoss argument
      share_temperature: true   # use LAVIS's learnable temp (default) or the loss's own
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Set

import torch
from torch.nn import functional as F

from vlp_codebook.checkpoint_io import torch_load_as_data
from vlp_codebook.checks import deferred_checks
from vlp_codebook.registry import MODELS
from vlp_codebook_lavis.encoders import build_vision_encoder, build_xbert_encoder, load_bert_tokenizer
from vlp_codebook_lavis.outputs import with_codis_terms

__all__ = ['CodisLossMixin', 'as_dict']

PLAN_FEATURES = ('teacher', 'student')


def as_dict(block: Any, name: str) -> Dict[str, Any]:
    """A plain dict from an OmegaConf node / mapping / None."""
    if block is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(block, DictConfig):
            block = OmegaConf.to_container(block, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with LAVIS
        pass
    if not isinstance(block, Mapping):
        raise TypeError(f'model.{name} must be a mapping of arguments, got {type(block).__name__}: {block!r}')
    return dict(block)


class CodisLossMixin:
    """Mixin for LAVIS ALBEF/BLIP classes; put it first: ``class X(CodisLossMixin, AlbefRetrieval)``.

    Its ``__init__`` takes LAVIS's arguments plus ``tokenizer``, ``codebook_loss`` and
    ``intra_modal_loss`` and calls :meth:`build_codis_losses` after LAVIS's ``__init__``; its
    ``from_config`` reads the class's ``lavis_defaults`` from the config.
    Set ``codis_uses_ids = True`` where samples carry ``image_id`` (retrieval): then captions of
    one image are positives of each other in the intra-modal terms, as in LAVIS's ITC.

    Submodules added (their state-dict keys are the only ones an ALBEF/BLIP checkpoint lacks):
    ``codebook_loss``, and with intra-modal terms ``intra_modal_loss``, ``codis_image_queue``,
    ``codis_text_queue``.
    """

    codis_uses_ids = False
    # LAVIS's constructor arguments that ``from_config`` reads from the model config, with
    # LAVIS's defaults (set by each model class).
    lavis_defaults: Dict[str, Any] = {}

    def __init__(self, image_encoder, text_encoder, queue_size, tokenizer=None, codebook_loss=None,
                 intra_modal_loss=None, **lavis_args):
        # read by init_tokenizer(), which LAVIS's __init__ calls first
        object.__setattr__(self, '_codis_tokenizer', tokenizer)
        super().__init__(image_encoder=image_encoder, text_encoder=text_encoder, queue_size=queue_size,
                         **lavis_args)
        self.build_codis_losses(lavis_args.get('embed_dim', 256), codebook_loss, intra_modal_loss,
                                default_queue_size=queue_size)

    def init_tokenizer(self):
        """The local tokenizer (``tokenizer``: a directory; default the offline bert-base-uncased vocab)."""
        return load_bert_tokenizer(self._codis_tokenizer)

    @classmethod
    def build_text_encoder(cls, cfg):
        return build_xbert_encoder(cfg)

    def load_config_weights(self, cfg) -> None:
        """LAVIS's checkpoint switches (:func:`load_weights_from_config`)."""
        load_weights_from_config(self, cfg)

    @classmethod
    def from_config(cls, cfg=None):
        """LAVIS's entry point: the model of a config's ``model:`` block; downloads nothing."""
        args = {name: cfg.get(name, default) for name, default in cls.lavis_defaults.items()}
        model = cls(image_encoder=build_vision_encoder(cfg), text_encoder=cls.build_text_encoder(cfg),
                    tokenizer=cfg.get('tokenizer'), codebook_loss=cfg.get('codebook_loss'),
                    intra_modal_loss=cfg.get('intra_modal_loss'), **args)
        model.load_config_weights(cfg)
        return model

    def build_codis_losses(self, embed_dim: int, codebook_loss: Any = None,
                           intra_modal_loss: Any = None, default_queue_size: int = 0) -> None:
        """Build the loss modules from the model config's blocks (see the module docstring)."""
        block = as_dict(codebook_loss, 'codebook_loss')
        plan = block.pop('plan_features', 'teacher')
        if plan not in PLAN_FEATURES:
            raise ValueError(f'model.codebook_loss.plan_features must be one of {PLAN_FEATURES}, got {plan!r}')
        block.setdefault('type', 'CodebookOTLoss')
        if block['type'] == 'CodebookOTLoss' and 'codebook' not in block:
            block.setdefault('embed_dim', embed_dim)
            if block['embed_dim'] != embed_dim:
                raise ValueError(f'model.codebook_loss.embed_dim={block["embed_dim"]} differs from the '
                                 f"model's embed_dim={embed_dim}")
        self.codebook_plan_features = plan
        self.codebook_loss = MODELS.build(block)

        intra = intra_modal_loss
        if intra is None or intra is False:
            self.intra_modal_loss = None
            return
        intra = as_dict({} if intra is True else intra, 'intra_modal_loss')
        queue_size = int(intra.pop('queue_size', default_queue_size))
        self.codis_share_temperature = bool(intra.pop('share_temperature', True))
        intra.setdefault('type', 'MultiDirectionalDistillationLoss')
        intra.setdefault('directions', ['i2i', 't2t'])
        if {'t2i', 'i2t'} & set(intra['directions']):
            logging.warning('model.intra_modal_loss.directions includes t2i/i2t: LAVIS\'s loss_itc already '
                            'is that cross-modal distillation, so it is counted twice')
        intra.setdefault('embed_dim', embed_dim)
        if self.codis_share_temperature:
            intra['learnable_temperature'] = False   # its own γ would get no gradient
        self.intra_modal_loss = MODELS.build(intra)
        if queue_size > 0:
            queue = dict(type='FeatureQueue', size=queue_size, dim=embed_dim, with_ids=self.codis_uses_ids)
            self.codis_image_queue = MODELS.build(queue)
            self.codis_text_queue = MODELS.build(queue)
        else:
            self.codis_image_queue = self.codis_text_queue = None

    # ------------------------------------------------------------------ forward
    def forward(self, samples):
        output = super().forward(samples)
        return with_codis_terms(output, self.codis_losses(output.intermediate_output, samples))

    def codis_features(self, intermediate) -> Dict[str, torch.Tensor]:
        """LAVIS's unit-norm contrastive features (B, embed_dim) of this forward:
        ``image_feat``, ``text_feat`` (with gradient), ``image_feat_m``, ``text_feat_m`` (teacher)."""
        feats = {
            'image_feat': F.normalize(self.vision_proj(intermediate.image_embeds[:, 0, :]), dim=-1),
            'text_feat': F.normalize(self.text_proj(intermediate.text_embeds[:, 0, :]), dim=-1),
        }
        with torch.no_grad():
            feats['image_feat_m'] = F.normalize(self.vision_proj_m(intermediate.image_embeds_m[:, 0, :]), dim=-1)
            feats['text_feat_m'] = F.normalize(self.text_proj_m(intermediate.text_embeds_m[:, 0, :]), dim=-1)
        return feats

    def codis_alpha(self, samples: Mapping) -> float:
        """LAVIS's distillation weight for this step (0 where the model has ``use_distill=False``)."""
        if not getattr(self, 'use_distill', True):
            return 0.0
        if all(k in samples for k in ('epoch', 'iters', 'num_iters_per_epoch')):
            return float(self.alpha * self._rampup_factor(epoch=samples['epoch'], iters=samples['iters'],
                                                           num_iters_per_epoch=samples['num_iters_per_epoch']))
        return float(self.alpha)

    def codis_losses(self, intermediate, samples: Mapping) -> Dict[str, torch.Tensor]:
        """The CODIS terms for one LAVIS forward (keys as in :data:`~vlp_codebook_lavis.outputs.CODIS_TERMS`).
        Their value checks (NaN/inf features...) are read once, together, at the end."""
        with deferred_checks():
            return self._codis_losses(intermediate, samples)

    def _codis_losses(self, intermediate, samples: Mapping) -> Dict[str, torch.Tensor]:
        feats = self.codis_features(intermediate)
        teacher = self.codebook_plan_features == 'teacher'
        code = self.codebook_loss(feats['image_feat'], feats['text_feat'],
                                  image_plan_feats=feats['image_feat_m'] if teacher else None,
                                  text_plan_feats=feats['text_feat_m'] if teacher else None)
        terms = {f'loss_code_{k[len("loss_"):]}': v for k, v in code.items()}
        terms['loss_code'] = sum(code.values())
        if self.intra_modal_loss is not None:
            terms.update(self._intra_modal_terms(feats, samples))
        return terms

    def _intra_modal_terms(self, feats, samples) -> Dict[str, torch.Tensor]:
        # image ids (retrieval): captions of one image are positives of each other
        ids = None
        if self.codis_uses_ids:
            ids = torch.as_tensor(samples['image_id']).view(-1).to(feats['image_feat'].device, torch.long)
        losses = self.intra_modal_loss(
            image_feats=feats['image_feat'], text_feats=feats['text_feat'],
            image_teacher_feats=feats['image_feat_m'], text_teacher_feats=feats['text_feat_m'],
            image_queue=self.codis_image_queue, text_queue=self.codis_text_queue,
            image_ids=ids, alpha=self.codis_alpha(samples),
            temperature=self.temp if self.codis_share_temperature else None)
        if self.training and self.codis_image_queue is not None:
            self.codis_image_queue.enqueue(feats['image_feat_m'], ids=ids)
            self.codis_text_queue.enqueue(feats['text_feat_m'], ids=ids)
        return losses

    # ------------------------------------------------------------ checkpoints
    def codis_state_keys(self) -> Set[str]:
        """State-dict keys of the CODIS additions (absent from ALBEF/BLIP checkpoints)."""
        prefixes = ('codebook_loss.', 'intra_modal_loss.', 'codis_image_queue.', 'codis_text_queue.')
        return {k for k in self.state_dict() if k.startswith(prefixes)}

    def report_missing_keys(self, msg, source: str) -> None:
        """Log the CODIS keys that start fresh; warn about any *other* key the checkpoint lacks."""
        if msg is None:
            return
        missing = set(msg.missing_keys)
        fresh = missing & self.codis_state_keys()
        other = sorted(missing - fresh)
        logging.info('%s: CODIS parameters start fresh: %s', source, sorted(fresh))
        if other:
            logging.warning('%s: the checkpoint lacks %d non-CODIS keys, e.g. %s', source, len(other), other[:5])


def load_weights_from_config(model, cfg: Mapping, pretrained_loader=None) -> Optional[Any]:
    """LAVIS's checkpoint switches, with nothing loaded (and no network) unless asked:

    * ``load_finetuned: true`` + ``finetuned``: a checkpoint of this architecture (``model.load_checkpoint``);
    * else ``load_pretrained: true`` + ``pretrained``: an ALBEF/BLIP checkpoint through
      ``pretrained_loader`` (default ``model.load_from_pretrained``: position embeddings interpolated);
    * else nothing: random initialisation.

    A URL is downloaded by LAVIS; a local path never touches the network. Either file is read
    against the schema (:func:`vlp_codebook.checkpoint_io.torch_load_as_data` around LAVIS's
    loader): tensors and plain data only, nothing in it runs. Returns the ``load_state_dict``
    result (or None).
    """
    if cfg.get('load_finetuned', False):
        path, load = cfg.get('finetuned'), model.load_checkpoint
        if not path:
            raise ValueError('model.load_finetuned is true but model.finetuned is empty')
    elif cfg.get('load_pretrained', False):
        path, load = cfg.get('pretrained'), pretrained_loader or model.load_from_pretrained
        if not path:
            raise ValueError('model.load_pretrained is true but model.pretrained is empty')
    else:
        return None
    with torch_load_as_data():
        msg = load(path)
    model.report_missing_keys(msg, path)
    return msg
