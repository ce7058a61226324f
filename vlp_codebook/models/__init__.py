"""Everything registered in :data:`vlp_codebook.registry.MODELS`.

Importing this package registers all entries (the registry does it lazily on first use).
"""
from . import encoders, heads, losses, teachers  # noqa: F401
from .codebook import Codebook  # noqa: F401
from . import tokenizers  # noqa: F401
from .data_preprocessor import VLPDataPreprocessor  # noqa: F401
from .codis import CODIS  # noqa: F401
