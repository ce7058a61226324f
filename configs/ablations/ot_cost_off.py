# No L_ot terms: the codebook learns from the swapped predictions alone.
_base_ = '../codis_base_pretrain.py'
model = dict(codebook_loss=dict(ot_cost_features='off'))
