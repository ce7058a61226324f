# N(0, 1) initial codewords (norm ~sqrt(d)): they turn ~sqrt(d) (16x at d=256) slower under AdamW
# than the default unit-norm ones, about lr radians per step like every other weight.
_base_ = '../codis_base_pretrain.py'
model = dict(codebook_loss=dict(codeword_init_norm=None))
