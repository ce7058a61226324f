# ALBEF / LAVIS JSON annotations. Training: a list of {"image", "caption"[, "image_id"]};
# retrieval evaluation: a list of {"image", "caption": [...]} (e.g. flickr30k_test.json).
# Paths are relative to the working directory; edit them or override with --cfg-options.
image_size = 256
# Collate functions are looked up in mmengine's root FUNCTIONS registry, which does not search
# child scopes by default: hence the scoped name.
train_dataloader = dict(
    batch_size=64,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='vlp_codebook.vlp_collate'),
    # ALBEF's pretraining transforms: random resized crop of 20-100 % of the area, horizontal
    # flip (ours swaps "left"/"right" in the caption too), RandAugment (2 ops at level 7).
    dataset=dict(type='CaptionPretrainDataset',
                 ann_file=['data/coco.json', 'data/vg.json', 'data/cc3m.json', 'data/sbu.json'],
                 image_root='data/images', image_size=image_size, max_words=30,
                 crop_scale=(0.2, 1.0), horizontal_flip_prob=0.5,
                 rand_augment=dict(num_ops=2, magnitude=7)),
)
val_dataloader = dict(
    batch_size=64,
    num_workers=4,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='vlp_codebook.vlp_collate'),
    dataset=dict(type='CaptionRetrievalDataset', ann_file='data/flickr30k_test.json',
                 image_root='data/flickr30k', image_size=image_size, max_words=30),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='RetrievalMetric', k=(1, 5, 10))
test_evaluator = val_evaluator
