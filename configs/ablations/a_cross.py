# Seed ablation row "a: MLM+ITM+ITC (cross align)": ALBEF's objectives, no codebook.
_base_ = '../codis_base_pretrain.py'
model = dict(distillation_loss=dict(directions=('t2i', 'i2t')), codebook_loss=None)
