# Seed ablation row "b + codebook (teacher feature)" = full CODIS (the base config).
_base_ = '../codis_base_pretrain.py'
