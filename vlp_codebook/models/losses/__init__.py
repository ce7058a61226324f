"""Registered losses. One concept per module; each returns a dict of named terms."""
from .codebook_ot_loss import CodebookOTLoss  # noqa: F401
from .distillation import MultiDirectionalDistillationLoss  # noqa: F401
