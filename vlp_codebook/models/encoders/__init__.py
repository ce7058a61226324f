"""Registered encoders of vlp_codebook."""
