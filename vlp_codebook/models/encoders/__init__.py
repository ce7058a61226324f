"""Registered encoders of vlp_codebook."""
from .bert import BertFusionEncoder, BertTextEncoder  # noqa: F401
from .projection import Projection  # noqa: F401
from .vit import ViTImageEncoder  # noqa: F401
