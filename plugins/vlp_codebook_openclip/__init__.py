"""CODIS for open_clip: the codebook (and optional intra-modal distillation) in open_clip's own
training loop.

* :class:`CodebookCLIP` wraps any open_clip model; it owns the codebook, the momentum teacher
  and the feature queues, so open_clip's optimizer, DDP, checkpoints and ``--lock-*`` flags see
  them;
* :class:`CodebookClipLoss` is open_clip's own loss (unchanged) plus the CODIS terms;
* ``python -m vlp_codebook_openclip.train <open_clip_train flags> --codebook-size 1024 ...``
  runs open_clip_train's ``main`` with both injected;
* ``python -m vlp_codebook_openclip.export CKPT OUT`` strips the CODIS keys so that plain
  ``open_clip.create_model_and_transforms(name, pretrained=OUT)`` loads the model.

The CODIS components come from the ``vlp_codebook`` core; nothing of open_clip is copied.
See ``docs/openclip.md``.
"""
from __future__ import annotations

try:
    import open_clip  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without open_clip
    raise ImportError('vlp_codebook_openclip needs open_clip (`pip install open-clip-torch==3.3.0`, done by '
                      f'`bash scripts/setup_env.sh test`): {error}') from error

from vlp_codebook_openclip.loss import CodebookClipLoss
from vlp_codebook_openclip.model import CodebookCLIP, infer_embed_dim

__all__ = ['CodebookCLIP', 'CodebookClipLoss', 'infer_embed_dim']
