# Codebook-size ablation: 3K codewords.
_base_ = '../codis_base_pretrain.py'
model = dict(codebook_loss=dict(num_codewords=3000))
