# Codebook-size ablation: 500 codewords.
_base_ = '../codis_base_pretrain.py'
model = dict(codebook_loss=dict(num_codewords=500))
