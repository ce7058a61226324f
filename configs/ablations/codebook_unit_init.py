# Unit-norm initial codewords: they turn ~sqrt(d) (16x at d=256) faster under AdamW than the default.
_base_ = '../codis_base_pretrain.py'
model = dict(codebook_loss=dict(codeword_init_norm=1.0))
