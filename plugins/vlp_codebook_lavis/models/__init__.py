"""LAVIS model classes with the CODIS terms (registered by ``import vlp_codebook_lavis``)."""
from .codis_blip_retrieval import CodisBlipRetrieval  # noqa: F401
from .codis_pretrain import CodisPretrain  # noqa: F401
from .codis_retrieval import CodisRetrieval  # noqa: F401
