"""Registered heads of vlp_codebook."""
from .itm import ImageTextMatchingHead, ImageTextMatchingLoss, itm_score, sample_hard_negatives  # noqa: F401
from .mlm import MaskedLanguageModelingHead, MaskedLanguageModelingLoss, mask_tokens  # noqa: F401
