"""Command-line tools: python -m vlp_codebook.tools.train / .test."""
