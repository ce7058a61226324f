# L_ot on the student features (pulls them towards codewords); the default is 'plan'.
_base_ = '../codis_base_pretrain.py'
model = dict(codebook_loss=dict(ot_cost_features='student'))
