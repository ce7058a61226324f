r"""``CodebookCLIP``: any open_clip model plus the CODIS codebook (and, optionally, intra-modal
distillation from momentum teachers), as one ``nn.Module``.

open_clip builds its optimizer from ``model.named_parameters()``, checkpoints ``model.state_dict()``
and locks towers through ``model.lock_image_tower`` / ``lock_text_tower``, so everything CODIS adds
lives *in the model*: ``codebook_loss`` (:class:`~vlp_codebook.models.losses.CodebookOTLoss` and
its codebook), ``teacher`` (a :class:`~vlp_codebook.models.teachers.MomentumTeacher` of the whole
CLIP model, built at the first training forward -- after open_clip_train's tower locks -- or when
a checkpoint with one is loaded), ``image_queue`` / ``text_queue`` and ``intra_loss`` (the
distillation loss restricted to i2i and t2t: open_clip's contrastive loss is the cross pair; it
uses open_clip's temperature ``1 / logit_scale``). Other attributes are the wrapped model's.

Forward in training mode: open_clip's output dict plus ``codis_losses`` (``codebook_i2p``,
``codebook_t2p``, ``codebook_ot_v``, ``codebook_ot_t``[, ``intra_i2i``, ``intra_t2t``]: fp32
scalars, already weighted) and ``codis_stats`` (logging scalars, read only when logged); the
order within a step is ALBEF's (EMA update, teacher features, terms against the queues before
this batch, enqueue). In eval mode: open_clip's dict unchanged, no state moves.
:class:`~vlp_codebook_openclip.loss.CodebookClipLoss` adds the terms to open_clip's own loss.

Example::

    >>> import open_clip, torch
    >>> from vlp_codebook_openclip import CodebookCLIP, CodebookClipLoss
    >>> clip, _, _ = open_clip.create_model_and_transforms('codis-tiny-vit', output_dict=True)
    >>> model = CodebookCLIP(clip, codebook_size=128)
    >>> model.set_steps_per_epoch(1)   # the steps of one epoch: the codebook terms start after it
    >>> loss = CodebookClipLoss(open_clip.ClipLoss())
    >>> out = model(torch.randn(4, 3, 32, 32), torch.randint(0, 49408, (4, 16)))
    >>> losses = loss(**out, output_dict=True)     # contrastive_loss + codebook_* terms
    >>> sum(losses.values()).backward()
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

from vlp_codebook.models.losses import CodebookOTLoss, MultiDirectionalDistillationLoss
from vlp_codebook.models.losses.functional import ramped_alpha
from vlp_codebook.models.teachers import FeatureQueue, MomentumTeacher

__all__ = ['CodebookCLIP', 'CodisStats', 'PLAN_FEATURES', 'CODIS_PREFIXES', 'infer_embed_dim']

PLAN_FEATURES = ('student', 'teacher')
# state_dict prefixes of what CodebookCLIP adds (the wrapped model's keys start with 'clip.')
CODIS_PREFIXES = ('codebook_loss.', 'teacher.', 'image_queue.', 'text_queue.', 'intra_loss.')


def infer_embed_dim(clip: nn.Module) -> Optional[int]:
    """The joint embedding dimension of an open_clip model, from its towers' attributes
    (``visual.output_dim``, ``text_projection``, ``text.output_dim``); None if none says."""
    visual = getattr(clip, 'visual', None)
    for owner, name in ((visual, 'output_dim'), (getattr(clip, 'text', None), 'output_dim')):
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value
    projection = getattr(clip, 'text_projection', None)
    if isinstance(projection, torch.Tensor) and projection.dim() == 2:
        return int(projection.shape[1])
    if isinstance(projection, nn.Linear):
        return int(projection.out_features)
    return None


def _tower_frozen(clip: nn.Module, tower: str) -> bool:
    """True when no parameter of the image (``visual.*``) or text tower (every other parameter
    but the logit scale/bias) is trained: a fully locked tower."""
    params = [p for n, p in clip.named_parameters()
              if (n.startswith('visual.') if tower == 'image'
                  else not n.startswith(('visual.', 'logit_scale', 'logit_bias')))]
    return bool(params) and not any(p.requires_grad for p in params)


class CodisStats:
    """Logging scalars of one step, read only when logged (no host read otherwise)."""

    def __init__(self, codebook_loss: CodebookOTLoss):
        self._codebook_loss = codebook_loss
        self._last = dict(codebook_loss.last_stats)

    def as_floats(self) -> Dict[str, float]:
        out = {'codebook_usage_perplexity': float(self._codebook_loss.codebook.perplexity())}
        for name, value in self._last.items():
            out[name if name.startswith('code_') else f'codebook_{name}'] = float(value)
        return out


def _check_arguments(codebook_size, codebook_weight, plan_features, plan_queue_size, codebook_warmup_steps,
                     intra, queue_size, alpha_warmup_steps, codebook_kwargs) -> None:
    """CodebookCLIP's arguments, each named in the error when wrong."""
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
        raise ValueError(f'codebook_size must be a positive integer, got {codebook_size!r}')
    if not (isinstance(codebook_weight, (int, float)) and math.isfinite(codebook_weight)
            and codebook_weight >= 0):
        raise ValueError(f'codebook_weight must be a finite number >= 0, got {codebook_weight!r}')
    if codebook_weight == 0 and not intra:
        raise ValueError('codebook_weight=0 without intra=True adds nothing to open_clip: '
                         'train the open_clip model alone')
    if plan_features not in PLAN_FEATURES:
        raise ValueError(f'plan_features must be one of {list(PLAN_FEATURES)}, got {plan_features!r}')
    if intra and (isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1):
        raise ValueError(f'intra=True needs queue_size >= 1 (past teacher features per modality), '
                         f'got {queue_size!r}')
    if alpha_warmup_steps < 0:
        raise ValueError(f'alpha_warmup_steps must be >= 0, got {alpha_warmup_steps}')
    for name, value in (('plan_queue_size', plan_queue_size), ('codebook_warmup_steps', codebook_warmup_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f'{name} must be None or an integer >= 0, got {value!r}')
    clash = {'plan_queue_size', 'warmup_steps'} & set(codebook_kwargs or {})
    if clash:
        raise ValueError(f'codebook_kwargs {sorted(clash)}: pass plan_queue_size / codebook_warmup_steps '
                         'as CodebookCLIP arguments')


class CodebookCLIP(nn.Module):
    r"""An open_clip model with the CODIS codebook terms (and optional intra-modal distillation).

    Args:
        clip: an open_clip model (``CLIP``, ``CustomTextCLIP``, ...) created with
            ``output_dict=True``.
        codebook_size: K, the number of codewords (> 0). Default 1024.
        codebook_weight: weight of every codebook term (>= 0). Default 1.0. ``0``: no codebook at
            all (with ``intra=True``: open_clip's loss plus the intra directions only).
        plan_features: ``'student'`` (default): the OT plans come from the student features of
            the batch, no teacher needed; ``'teacher'``: from a momentum teacher's (the paper's
            choice; one more forward of both towers per step).
        plan_queue_size: past plan features per modality each Sinkhorn solve also transports, so
            that a batch smaller than K still gets peaked targets (0: off). Default None: K.
        codebook_warmup_steps: training steps at the start with every codebook term at zero
            (0: off). Default None: one epoch, whose length :meth:`set_steps_per_epoch` gives
            (``vlp_codebook_openclip.train`` calls it; in your own loop call it before training,
            or a training forward raises). The defaults of both follow docs/openclip.md's
            paired-seed measurements.
        intra: add the intra-modal distillation directions i2i and t2t (needs ``queue_size``).
        momentum: the teacher's EMA momentum (ALBEF: 0.995).
        queue_size: rows of past teacher features per modality for the intra directions.
        intra_weight: weight of each intra direction. Default 1.0.
        alpha: ALBEF's distillation weight of the teacher's softmax in the intra targets (0.4),
            ramped linearly over ``alpha_warmup_steps`` training steps (0: no ramp;
            ``vlp_codebook_openclip.train`` sets one epoch).
        embed_dim: the joint embedding dimension; inferred from ``clip`` when None.
        codebook_kwargs: further :class:`~vlp_codebook.models.losses.CodebookOTLoss` arguments
            (``epsilon``, ``temperature``, ``ot_cost_features``, ``codeword_init_norm`` ...).
    """

    def __init__(self,
                 clip: nn.Module,
                 codebook_size: int = 1024,
                 codebook_weight: float = 1.0,
                 plan_features: str = 'student',
                 plan_queue_size: Optional[int] = None,
                 codebook_warmup_steps: Optional[int] = None,
                 intra: bool = False,
                 momentum: float = 0.995,
                 queue_size: int = 0,
                 intra_weight: float = 1.0,
                 alpha: float = 0.4,
                 alpha_warmup_steps: int = 0,
                 embed_dim: Optional[int] = None,
                 codebook_kwargs: Optional[dict] = None):
        super().__init__()
        if not isinstance(clip, nn.Module):
            raise TypeError(f'clip must be an open_clip model (nn.Module), got {type(clip).__name__}')
        _check_arguments(codebook_size, codebook_weight, plan_features, plan_queue_size, codebook_warmup_steps,
                         intra, queue_size, alpha_warmup_steps, codebook_kwargs)
        if embed_dim is None:
            embed_dim = infer_embed_dim(clip)
            if embed_dim is None:
                raise ValueError(f'cannot infer the embedding dimension of {type(clip).__name__}: '
                                 'pass embed_dim')
        self.clip = clip
        self.embed_dim = int(embed_dim)
        self.plan_features = plan_features
        self.intra = bool(intra)
        self.alpha = float(alpha)
        self.alpha_warmup_steps = int(alpha_warmup_steps)
        self.codebook_loss = None
        # None: one epoch, set by set_steps_per_epoch (1 here only registers the loss's step counter)
        self.warmup_one_epoch = codebook_warmup_steps is None and codebook_weight > 0
        self.steps_per_epoch: Optional[int] = None
        if codebook_weight > 0:
            self.codebook_loss = CodebookOTLoss(
                num_codewords=codebook_size, embed_dim=self.embed_dim, loss_weight=float(codebook_weight),
                plan_queue_size=codebook_size if plan_queue_size is None else plan_queue_size,
                warmup_steps=1 if codebook_warmup_steps is None else codebook_warmup_steps,
                **dict(codebook_kwargs or {}))
        # Built at the first training forward (or checkpoint load), after open_clip_train has
        # locked towers: --lock-image-freeze-bn-stats replaces the trunk's BatchNorm modules.
        self.needs_teacher = plan_features == 'teacher' or self.intra
        self.momentum = float(momentum)
        self.teacher = None
        self.image_queue = self.text_queue = self.intra_loss = None
        if self.intra:
            self.image_queue = FeatureQueue(queue_size, self.embed_dim)
            self.text_queue = FeatureQueue(queue_size, self.embed_dim)
            # A fixed temperature buffer: the intra directions use open_clip's logit_scale.
            self.intra_loss = MultiDirectionalDistillationLoss(
                directions=('i2i', 't2t'), loss_weight=float(intra_weight), alpha=self.alpha,
                learnable_temperature=False, embed_dim=self.embed_dim)

    # ------------------------------------------------------------ open_clip's interface
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            clip = self.__dict__.get('_modules', {}).get('clip')
            if clip is None:
                raise
            return getattr(clip, name)

    def set_steps_per_epoch(self, steps: int) -> None:
        """The training steps of one epoch: the alpha ramp of the intra targets lasts one epoch,
        and so does the codebook warm-up when ``codebook_warmup_steps`` was None."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f'steps must be a positive integer (training steps per epoch), got {steps!r}')
        self.steps_per_epoch = steps
        self.alpha_warmup_steps = steps
        if self.warmup_one_epoch:
            self.codebook_loss.warmup_steps = steps

    def _ensure_teacher(self) -> MomentumTeacher:
        if self.teacher is None:
            self.teacher = MomentumTeacher(self.clip, momentum=self.momentum)
        return self.teacher

    @property
    def codebook(self):
        """The :class:`~vlp_codebook.models.codebook.Codebook` (its ``weight`` is trained); None
        with ``codebook_weight=0``."""
        return None if self.codebook_loss is None else self.codebook_loss.codebook

    def no_weight_decay(self) -> set:
        """Parameter names not to decay (timm's optimizer factory and open_clip's newer
        ``--wd-exclude`` logic ask models this): the wrapped model's, and the codewords, which
        are normalised when used, so decay only shrinks their norm and speeds up their turning
        under AdamW."""
        inner = getattr(self.clip, 'no_weight_decay', None)
        names = {f'clip.{name}' for name in (inner() if callable(inner) else ())}
        return names | ({'codebook_loss.codebook.weight'} if self.codebook_loss is not None else set())

    def _teacher_features(self, image, text, out):
        """The momentum teacher's normalised features; a fully locked tower's teacher is the
        tower itself (EMA of constant weights), so its student features are reused."""
        teacher = self.teacher.module
        with torch.no_grad():
            if _tower_frozen(self.clip, 'image'):
                image_m = out['image_features'].detach()
            else:
                image_m = teacher.encode_image(image, normalize=True)
            if _tower_frozen(self.clip, 'text'):
                text_m = out['text_features'].detach()
            else:
                text_m = teacher.encode_text(text, normalize=True)
        return image_m, text_m

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None):
        out = self.clip(image, text)
        if not isinstance(out, dict):
            raise TypeError('CodebookCLIP needs the open_clip model created with output_dict=True '
                            f'(it returned {type(out).__name__})')
        if not self.training or image is None or text is None:
            return out
        if self.warmup_one_epoch and self.steps_per_epoch is None:
            raise RuntimeError('CodebookCLIP(codebook_warmup_steps=None) warms the codebook up for one epoch: '
                               'call model.set_steps_per_epoch(N) before training, or pass '
                               'codebook_warmup_steps (0: no warm-up)')
        image_feats, text_feats = out['image_features'], out['text_features']
        image_m = text_m = None
        if self.needs_teacher:
            self.teacher = self._ensure_teacher()
            self.teacher.update(self.clip)
            image_m, text_m = self._teacher_features(image, text, out)
        losses: Dict[str, torch.Tensor] = {}
        plans = (image_m, text_m) if self.plan_features == 'teacher' else (None, None)
        if self.codebook_loss is not None:
            for name, value in self.codebook_loss(image_feats, text_feats, *plans).items():
                losses['codebook_' + name[len('loss_'):]] = value
        if self.intra:
            step = self.teacher.counter('num_updates') - 1
            alpha = ramped_alpha(self.alpha, step, self.alpha_warmup_steps)
            intra = self.intra_loss(image_feats=image_feats, text_feats=text_feats,
                                    image_teacher_feats=image_m, text_teacher_feats=text_m,
                                    image_queue=self.image_queue, text_queue=self.text_queue,
                                    alpha=alpha,
                                    temperature=1.0 / out['logit_scale'].float())
            for name, value in intra.items():
                losses['intra_' + name[len('loss_'):]] = value
            self.image_queue.enqueue(image_m)
            self.text_queue.enqueue(text_m)
        out['codis_losses'] = losses
        out['codis_stats'] = CodisStats(self.codebook_loss) if self.codebook_loss is not None else None
        return out

    # ------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, with an error that names the flags when the
        checkpoint's codebook or CODIS parts do not fit this model."""
        if self.needs_teacher and any(k.startswith(('teacher.', 'module.teacher.')) for k in state_dict):
            self._ensure_teacher()
        key = 'codebook_loss.codebook.weight'
        weight = state_dict.get(key, state_dict.get('module.' + key))
        own = self.codebook.weight if self.codebook is not None else None
        if weight is not None and own is not None and tuple(weight.shape) != tuple(own.shape):
            raise ValueError(
                f'the checkpoint has a codebook of {weight.shape[0]} codewords of dimension {weight.shape[1]}, '
                f'this model {own.shape[0]} of dimension {own.shape[1]}: resume with the same '
                f'--codebook-size and --model (embed dim {own.shape[1]}) as the run that wrote it')
        if strict and not any(k.startswith(('clip.', 'module.clip.')) for k in state_dict):
            raise ValueError('the checkpoint is not a CodebookCLIP state dict (no clip.* keys): a plain '
                             'open_clip checkpoint is loaded with --pretrained, not --resume')
        if strict:
            own_keys = set(self.state_dict())
            given = {k[len('module.'):] if k.startswith('module.') else k for k in state_dict}
            missing = sorted(k for k in own_keys - given if k.startswith(CODIS_PREFIXES))
            extra = sorted(k for k in given - own_keys if k.startswith(CODIS_PREFIXES))
            if missing or extra:
                raise ValueError(
                    'the checkpoint was trained with other CODIS options: '
                    f'{len(missing)} keys missing (e.g. {missing[:3]}), {len(extra)} unexpected '
                    f'(e.g. {extra[:3]}); resume with the same --codebook-plan-features / --codebook-plan-queue / '
                    '--codebook-warmup-steps / --codebook-weight 0 / --codis-intra / --queue-size as the run that wrote it')
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
