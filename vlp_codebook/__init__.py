"""vlp_codebook: CODIS (Duan et al., CVPR 2022) as modular vision-language pretraining components."""
__version__ = '0.1.0'
