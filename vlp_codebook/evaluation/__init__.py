"""Metrics registered in vlp_codebook.registry.METRICS."""
