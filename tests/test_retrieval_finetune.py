"""The retrieval fine-tuning configs (ALBEF's recipe): their settings, and a tiny end-to-end run of
the COCO config on ALBEF-format JSON files -- load_from a pretraining checkpoint at another image
size, train without MLM, validate and test with ITM re-ranking, keep the best checkpoint."""
import json
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

from vlp_codebook.datasets.synthetic_shapes import SyntheticShapesDataset
from vlp_codebook.tools import test as test_tool
from vlp_codebook.tools import train as train_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
COCO = osp.join(ROOT, 'configs', 'codis_retrieval_coco_finetune.py')
FLICKR = osp.join(ROOT, 'configs', 'codis_retrieval_flickr_finetune.py')


@pytest.mark.parametrize('path, epochs, k, warmup', [(COCO, 5, 256, 2214), (FLICKR, 10, 128, 567)])
def test_finetune_configs_follow_albef(path, epochs, k, warmup):
    cfg = Config.fromfile(path)
    assert cfg.model.mlm_loss is None and cfg.model.codebook_loss is not None
    assert cfg.model.image_encoder.image_size == 384 == cfg.train_dataloader.dataset.image_size
    assert cfg.train_dataloader.dataset.crop_scale == (0.5, 1.0)
    assert cfg.train_dataloader.dataset.rand_augment == dict(num_ops=2, magnitude=7)
    assert cfg.optim_wrapper.optimizer.lr == 1e-5 and cfg.optim_wrapper.optimizer.weight_decay == 0.02
    assert cfg.train_cfg.max_epochs == epochs == cfg.param_scheduler[0].end
    assert cfg.param_scheduler[0].eta_min == 1e-6
    assert (cfg.val_cfg.type, cfg.val_cfg.k, cfg.test_cfg.type, cfg.test_cfg.k) == \
        ('ITMRerankValLoop', k, 'ITMRerankTestLoop', k)
    assert cfg.model.alpha_warmup_iters == warmup
    name = 'coco' if path == COCO else 'flickr30k'
    assert cfg.train_dataloader.dataset.ann_file == f'data/{name}_train.json'
    assert cfg.test_dataloader.dataset.ann_file == f'data/{name}_test.json'


TINY_FINETUNE = """
_base_ = [{base!r}]
model = dict(
    embed_dim=16, queue_size=16, alpha_warmup_iters=2,
    image_encoder=dict(image_size=48, patch_size=8, hidden_size=32, num_layers=1, num_heads=2),
    text_encoder=dict(vocab_size=None, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=32),
    fusion_encoder=dict(hidden_size=32, num_layers=1, num_heads=2, encoder_width=32),
    data_preprocessor=dict(tokenizer=dict(_delete_=True, type='BertTokenizerFromVocab', vocab={vocab!r}),
                           max_length=16),
    codebook_loss=dict(num_codewords=8),
)
_data = dict(image_root={root!r}, image_size=48)
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=dict(ann_file={train!r}, **_data))
val_dataloader = dict(batch_size=4, num_workers=0, dataset=dict(ann_file={test!r}, **_data))
test_dataloader = val_dataloader
val_cfg = dict(k=3)
test_cfg = dict(k=3)
max_epochs = 1
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min=0.0,
                        convert_to_iter_based=True)]
# lr 0: the weights stay the loaded ones, so the test can check what load_from loaded.
optim_wrapper = dict(optimizer=dict(lr=0.0, weight_decay=0.0))
load_from = {ckpt!r}
"""


@pytest.fixture(scope='module')
def albef_json(tmp_path_factory):
    """6 train and 4 test images of the synthetic shapes as PNG files with ALBEF-format JSON."""
    root = tmp_path_factory.mktemp('retrieval_json')
    files = {}
    for split, count in (('train', 6), ('test', 4)):
        data = SyntheticShapesDataset(num_images=count, split=split, image_size=48, captions_per_image=2)
        entries = []
        for i in range(count):
            item = data[i]
            name = f'{split}_{i}.png'
            pixels = (item['image'].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(root / name)
            texts = item['texts'] if 'texts' in item else [item['text']]
            if split == 'train':
                entries += [dict(image=name, caption=t, image_id=f'img{i}') for t in texts]
            else:
                entries.append(dict(image=name, caption=texts))
        files[split] = str(root / f'{split}.json')
        with open(files[split], 'w') as f:
            json.dump(entries, f)
    return str(root), files


def test_tiny_coco_finetune_end_to_end(albef_json, tmp_path):
    root, files = albef_json
    # A "pretraining" checkpoint of the same tiny model at 32 px (another position grid).
    pretrain_cfg = tmp_path / 'pretrain.py'
    pretrain_cfg.write_text(TINY_FINETUNE.format(base=COCO, vocab=SyntheticShapesDataset.vocabulary(), root=root,
                                                 train=files['train'], test=files['test'], ckpt=None)
                            + "model.update(image_encoder=dict(image_size=32, patch_size=8, hidden_size=32, "
                              "num_layers=1, num_heads=2))\n")
    from vlp_codebook.engine.config import load_config
    from vlp_codebook.models.encoders.vit import resize_position_embeddings
    from vlp_codebook.registry import MODELS
    torch.manual_seed(0)
    pretrained = MODELS.build(load_config(str(pretrain_cfg)).model)
    ckpt = tmp_path / 'pretrain.pth'
    torch.save({'state_dict': pretrained.state_dict()}, ckpt)

    config = tmp_path / 'finetune.py'
    config.write_text(TINY_FINETUNE.format(base=COCO, vocab=SyntheticShapesDataset.vocabulary(), root=root,
                                           train=files['train'], test=files['test'], ckpt=str(ckpt)))
    work_dir = tmp_path / 'work'
    runner = train_tool.main([str(config), '--work-dir', str(work_dir)])
    model = runner.model

    hub = runner.message_hub
    assert hub.get_scalar('train/loss_itm') is not None and hub.get_scalar('train/loss_code_i2p') is not None
    assert 'train/loss_mlm' not in hub.log_scalars
    assert 0.0 <= hub.get_scalar('val/retrieval/r_mean').current() <= 100.0
    assert list(work_dir.glob('best_retrieval_r_mean_epoch_1.pth'))
    # load_from loaded the pretraining weights: the 32 px grid resized to 48 px, the rest as saved.
    grid = pretrained.image_tower.encoder.vit.embeddings.position_embeddings
    torch.testing.assert_close(model.image_tower.encoder.vit.embeddings.position_embeddings.data,
                               resize_position_embeddings(grid.data, 36))
    assert torch.equal(model.text_tower.encoder.word_embeddings.weight, pretrained.text_tower.encoder.word_embeddings.weight)
    assert torch.equal(model.itm_head.classifier.weight, pretrained.itm_head.classifier.weight)

    metrics = test_tool.main([str(config), str(work_dir / 'epoch_1.pth'), '--work-dir', str(work_dir)])
    assert set(metrics) >= {'retrieval/txt_r1', 'retrieval/img_r1', 'retrieval/r_mean'}
    # 4 test images, 8 captions: image retrieval within the top 10 cannot miss.
    assert metrics['retrieval/img_r10'] == 100.0
