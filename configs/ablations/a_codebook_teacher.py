# Seed ablation row "a + codebook (teacher feature)".
_base_ = '../codis_base_pretrain.py'
model = dict(distillation_loss=dict(directions=('t2i', 'i2t')), codebook_plan_features='teacher')
