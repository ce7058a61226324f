# Fine-tune a pretrained CODIS for COCO image-text retrieval, as ALBEF fine-tunes (paper table
# "finetuned image/text retrieval"): 384 px, 5 epochs at lr 1e-5, ITM re-ranking of the top 256.
# Objectives: L_code + L_align + L_itm. ALBEF drops MLM here; the paper does not say whether
# CODIS keeps the codebook term while fine-tuning -- we keep it (`model.codebook_loss=None`
# drops it). The pretraining checkpoint's 256 px position grid is resized to 384 px on load.
_base_ = [
    './_base_/models/codis_vit_b16_bert_base.py',
    './_base_/datasets/coco_retrieval.py',
    './_base_/schedules/finetune_retrieval_5e.py',
    './_base_/default_runtime.py',
]
model = dict(
    image_encoder=dict(image_size={{_base_.image_size}}),
    mlm_loss=None,
    # ALBEF ramps alpha over the first epoch: 566,747 COCO training pairs / (8 GPUs x 32).
    alpha_warmup_iters=2214,
)
# The pretrained CODIS to start from (the train tool's default work dir of codis_base_pretrain);
# override with --cfg-options load_from=... . A converted ALBEF checkpoint works too
# (python -m vlp_codebook.tools.convert_albef, docs/training.md).
load_from = 'work_dirs/codis_base_pretrain/epoch_30.pth'
# Keep the checkpoint with the best validation R-mean, as ALBEF selects its model.
default_hooks = dict(checkpoint=dict(save_best='retrieval/r_mean', rule='greater'))
