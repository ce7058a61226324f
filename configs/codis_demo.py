# A tiny CODIS that trains on 2 CPU cores in a few minutes on the embedded synthetic-shapes data
# and prints the retrieval table after epochs 5 and 10 (checkpoints epoch_5.pth, epoch_10.pth).
# Same objectives as the full model.
_base_ = [
    './_base_/models/codis_vit_b16_bert_base.py',
    './_base_/datasets/synthetic_shapes.py',
    './_base_/schedules/pretrain_30e.py',
    './_base_/default_runtime.py',
]
hidden = 64
model = dict(
    embed_dim=32,
    image_encoder=dict(image_size={{_base_.image_size}}, patch_size=8, hidden_size=hidden,
                       num_layers=2, num_heads=4),
    # vocab_size=None: taken from the tokenizer.
    # intermediate_size: the FFN width must be given, else BERT-base's 3072 is used (48x the
    # hidden size here: it took most of the demo's time).
    text_encoder=dict(vocab_size=None, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_layers=1, num_heads=4, max_position_embeddings=32),
    # Two fusion layers: Grad-CAM reads the first one's cross-attention (the last layer's word
    # maps vanish, only [CLS] feeds the ITM head from there; docs/analysis.md).
    fusion_encoder=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_layers=2, num_heads=4,
                        encoder_width=hidden),
    data_preprocessor=dict(
        tokenizer=dict(_delete_=True, type='BertTokenizerFromVocab', vocab={{_base_.shapes_vocabulary}}),
        max_length=16),
    queue_size=512,
    codebook_loss=dict(num_codewords=64),
    alpha_warmup_iters=125,
)
optim_wrapper = dict(optimizer=dict(lr=5e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=10, eta_min=1e-5,
         convert_to_iter_based=True),
]
# 10 epochs x 125 iterations: about 3 minutes on 2 quiet CPU cores.
train_cfg = dict(max_epochs=10, val_interval=5)
default_hooks = dict(logger=dict(interval=25), checkpoint=dict(interval=5))
# One torch thread (the train tool applies it when no GPU is used): the tensors here are 64 wide,
# too small to split; with 2 threads the same iterations took 1.3-1.7x the CPU time (13x with
# OpenMP's default spin-waiting, which the tools now turn off) on a 2-core machine shared with
# other work.
env_cfg = dict(cpu_threads=1)
