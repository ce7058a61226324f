# Seed ablation row "b + codebook (student feature)": plans from the student embeddings.
_base_ = '../codis_base_pretrain.py'
model = dict(codebook_plan_features='student')
