# Fine-tune a pretrained CODIS for Flickr30K retrieval (ALBEF's configs/Retrieval_flickr.yaml):
# the COCO recipe with Flickr30K's JSON files (same format), 10 epochs and ITM re-ranking of
# the top 128.
_base_ = './codis_retrieval_coco_finetune.py'
train_dataloader = dict(dataset=dict(ann_file='data/flickr30k_train.json', image_root='data/flickr30k'))
val_dataloader = dict(dataset=dict(ann_file='data/flickr30k_val.json', image_root='data/flickr30k'))
test_dataloader = dict(dataset=dict(ann_file='data/flickr30k_test.json', image_root='data/flickr30k'))
max_epochs = 10
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min=1e-6,
                        convert_to_iter_based=True)]
val_cfg = dict(k=128)
test_cfg = dict(k=128)
# 145,000 Flickr30K training pairs / (8 GPUs x 32).
model = dict(alpha_warmup_iters=567)
