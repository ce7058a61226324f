"""CODIS for Salesforce LAVIS: ``import vlp_codebook_lavis`` registers in LAVIS's registry

* models (``arch``): ``codis_retrieval`` (ALBEF retrieval; types ``coco, flickr, tiny``),
  ``codis_pretrain`` (ALBEF pretraining; ``base, tiny``), ``codis_blip_retrieval`` (BLIP
  retrieval; ``coco, flickr, tiny``), each plus the CODIS terms;
* tasks (``run.task``): ``codis_retrieval`` and ``codis_image_text_pretrain`` (LAVIS's, logging
  every loss term by name).

The CODIS terms come from the ``vlp_codebook`` registry; nothing of the method is
re-implemented here. Registration is idempotent. Train with
``python -m vlp_codebook_lavis.train --cfg-path my_codis.yaml``; see ``docs/lavis.md``.

Example::

    >>> import vlp_codebook_lavis
    >>> from lavis.models import load_model
    >>> model = load_model('codis_retrieval', 'tiny')
"""
from __future__ import annotations

try:
    import lavis  # noqa: F401  (importing lavis fills its registry: needed before ours)
except ImportError as error:  # pragma: no cover - exercised only without LAVIS
    raise ImportError(
        'vlp_codebook_lavis needs Salesforce LAVIS 1.0.2, which failed to import '
        f'({error}). Install it with `bash plugins/install_lavis.sh <venv python>`: '
        '`pip install salesforce-lavis` alone replaces torch and numpy; see docs/lavis.md.'
    ) from error

from vlp_codebook_lavis.models import CodisBlipRetrieval, CodisPretrain, CodisRetrieval
from vlp_codebook_lavis.registration import register_once
from vlp_codebook_lavis.tasks import CodisImageTextPretrainTask, CodisRetrievalTask

__all__ = ['CodisRetrieval', 'CodisPretrain', 'CodisBlipRetrieval', 'CodisRetrievalTask',
           'CodisImageTextPretrainTask', 'MODEL_NAMES', 'TASK_NAMES', 'register_all']

MODEL_NAMES = {
    'codis_retrieval': CodisRetrieval,
    'codis_pretrain': CodisPretrain,
    'codis_blip_retrieval': CodisBlipRetrieval,
}
TASK_NAMES = {
    'codis_retrieval': CodisRetrievalTask,
    'codis_image_text_pretrain': CodisImageTextPretrainTask,
}


def register_all() -> None:
    """Register :data:`MODEL_NAMES` and :data:`TASK_NAMES` in LAVIS (idempotent)."""
    for name, cls in MODEL_NAMES.items():
        register_once('model', name, cls)
    for name, cls in TASK_NAMES.items():
        register_once('task', name, cls)


register_all()
