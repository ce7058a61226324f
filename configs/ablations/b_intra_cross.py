# Seed ablation row "b: MLM+ITM+ITC (intra + cross)": all four directions, no codebook.
_base_ = '../codis_base_pretrain.py'
model = dict(codebook_loss=None)
