"""Datasets registered in vlp_codebook.registry.DATASETS."""
