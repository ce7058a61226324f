"""Registered teachers of vlp_codebook."""
