# COCO retrieval, Karpathy split, in ALBEF's JSON format: coco_train.json is a list of
# {"image", "caption", "image_id"} (one entry per caption; the id makes the 5 captions of an
# image positives of each other); coco_val.json / coco_test.json are lists of
# {"image", "caption": [...]} (5k images each). Image paths are joined to image_root.
# ALBEF's fine-tuning transforms: 384 px, random resized crop of 50-100 % of the area,
# horizontal flip (ours also swaps "left"/"right" in the caption), RandAugment (2 ops, level 7).
image_size = 384
train_dataloader = dict(
    batch_size=32,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='vlp_codebook.vlp_collate'),
    dataset=dict(type='CaptionPretrainDataset', ann_file='data/coco_train.json', image_root='data/coco',
                 image_size=image_size, max_words=30, crop_scale=(0.5, 1.0), horizontal_flip_prob=0.5,
                 rand_augment=dict(num_ops=2, magnitude=7)),
)
eval_dataset = dict(type='CaptionRetrievalDataset', image_root='data/coco', image_size=image_size, max_words=30)
val_dataloader = dict(
    batch_size=64,
    num_workers=4,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='vlp_codebook.vlp_collate'),
    dataset=dict(eval_dataset, ann_file='data/coco_val.json'),
)
test_dataloader = dict(val_dataloader, dataset=dict(eval_dataset, ann_file='data/coco_test.json'))
val_evaluator = dict(type='RetrievalMetric', k=(1, 5, 10))
test_evaluator = val_evaluator
