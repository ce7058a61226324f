# Codebook-weight ablation "2.0x codebook": every L_code term weighted 2.0.
_base_ = '../codis_base_pretrain.py'
model = dict(codebook_loss=dict(loss_weight=2.0))
