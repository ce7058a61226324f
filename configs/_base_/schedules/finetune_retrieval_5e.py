# ALBEF's retrieval fine-tuning schedule (configs/Retrieval_coco.yaml): AdamW lr 1e-5, weight
# decay 0.02, cosine decay to 1e-6, 5 epochs (Flickr30K: 10). Validation and test re-rank the
# top-k candidates with the ITM head (ALBEF k_test: 256 on COCO, 128 on Flickr30K).
max_epochs = 5
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-5, weight_decay=0.02))
param_scheduler = [
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min=1e-6,
         convert_to_iter_based=True),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ITMRerankValLoop', k=256)
test_cfg = dict(type='ITMRerankTestLoop', k=256)
