"""Registered teachers of vlp_codebook: the momentum (EMA) teacher and the feature queue."""
from .feature_queue import FeatureQueue  # noqa: F401
from .momentum_teacher import MomentumTeacher, unwrap_model  # noqa: F401
