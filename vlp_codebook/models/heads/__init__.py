"""Registered heads of vlp_codebook."""
