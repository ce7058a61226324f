# The embedded default dataset: procedurally rendered two-object scenes with compositional
# captions ("a small red circle left of a blue square"), generated deterministically; no download.
image_size = 32
# SyntheticShapesDataset.vocabulary() (tests/test_configs.py checks that they agree).
shapes_vocabulary = [
    '[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'above', 'and', 'below', 'blue', 'circle',
    'green', 'is', 'large', 'left', 'of', 'over', 'picture', 'red', 'right', 'small', 'square',
    'the', 'there', 'to', 'triangle', 'under', 'yellow']
# Collate functions are looked up in mmengine's root FUNCTIONS registry, which does not search
# child scopes by default: hence the scoped name.
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='vlp_codebook.vlp_collate'),
    dataset=dict(type='SyntheticShapesDataset', split='train', num_images=2000, image_size=image_size),
)
val_dataloader = dict(
    batch_size=50,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='vlp_codebook.vlp_collate'),
    dataset=dict(type='SyntheticShapesDataset', split='test', num_images=100, image_size=image_size),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='RetrievalMetric', k=(1, 5, 10))
test_evaluator = val_evaluator
