# Codebook-weight ablation "0.5x codebook": every L_code term weighted 0.5.
_base_ = '../codis_base_pretrain.py'
model = dict(codebook_loss=dict(loss_weight=0.5))
