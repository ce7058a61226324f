"""CODIS through the mmengine Runner: train, checkpoint, resume, test, with the shipped demo config."""
import os.path as osp

import pytest

from vlp_codebook.tools import test as test_tool
from vlp_codebook.tools import train as train_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = osp.join(ROOT, 'configs', 'codis_demo.py')
# 48 pairs / batch 8 = 6 iterations per epoch; evaluation on 10 images x 5 captions.
SMALL = ['train_dataloader.dataset.num_images=24', 'train_dataloader.batch_size=8',
         'val_dataloader.dataset.num_images=10', 'val_dataloader.batch_size=5',
         'test_dataloader.dataset.num_images=10', 'test_dataloader.batch_size=5',
         'train_cfg.max_epochs=2', 'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=1',
         'default_hooks.logger.interval=1', 'model.queue_size=32', 'model.alpha_warmup_iters=4',
         'param_scheduler.0.end=2', 'param_scheduler.1.end=2']
ITERS_PER_EPOCH = 6
TERMS = ['loss_t2i', 'loss_i2t', 'loss_i2i', 'loss_t2t', 'loss_code_i2p', 'loss_code_t2p',
         'loss_code_ot_v', 'loss_code_ot_t', 'loss_itm', 'loss_mlm']


def _history(runner, key):
    return [float(v) for v in runner.message_hub.get_scalar(f'train/{key}').data[0]]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('codis_demo'))
    runner = train_tool.main([DEMO, '--work-dir', work_dir, '--cfg-options', *SMALL])
    return work_dir, runner


def test_training_logs_every_term_and_validates(trained):
    work_dir, runner = trained
    for term in TERMS:
        history = _history(runner, term)
        assert len(history) == 2 * ITERS_PER_EPOCH
        assert all(v == v for v in history)          # no NaN
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth')) and osp.isfile(osp.join(work_dir, 'epoch_2.pth'))
    assert 0.0 <= runner.message_hub.get_scalar('val/retrieval/r_mean').current() <= 100.0


def test_resume_gives_the_same_next_losses(trained, tmp_path):
    work_dir, runner = trained
    resumed = train_tool.main([DEMO, '--work-dir', str(tmp_path), '--resume', osp.join(work_dir, 'epoch_1.pth'),
                               '--cfg-options', *SMALL])
    for term in ('loss', 'loss_code_i2p', 'loss_t2t', 'loss_itm', 'loss_mlm'):
        # The resumed message hub carries epoch 1's history from the checkpoint: compare epoch 2.
        uninterrupted = _history(runner, term)[-ITERS_PER_EPOCH:]
        again = _history(resumed, term)[-ITERS_PER_EPOCH:]
        assert len(_history(resumed, term)) == 2 * ITERS_PER_EPOCH
        assert again == pytest.approx(uninterrupted, rel=1e-5, abs=1e-6), term


def test_test_tool_reports_retrieval_recalls(trained):
    work_dir, _ = trained
    metrics = test_tool.main([DEMO, osp.join(work_dir, 'epoch_2.pth'), '--work-dir', work_dir,
                              '--cfg-options', *SMALL])
    for key in ('txt_r1', 'txt_r5', 'txt_r10', 'img_r1', 'img_r5', 'img_r10', 'r_mean'):
        value = metrics[f'retrieval/{key}']
        assert 0.0 <= value <= 100.0
    # 10 images: image retrieval within the top 10 cannot miss.
    assert metrics['retrieval/img_r10'] == 100.0


def test_missing_annotation_file_is_named(tmp_path):
    missing = tmp_path / 'nope.json'
    cfg = train_tool.build_train_config(train_tool.parse_args([DEMO, '--work-dir', str(tmp_path)]))
    cfg.train_dataloader.dataset = dict(type='CaptionPretrainDataset', ann_file=str(missing))
    runner = train_tool.build_runner(cfg)
    with pytest.raises(FileNotFoundError, match='nope.json'):
        runner.train()


def test_itm_rerank_test_loop_matches_an_independent_rerank(trained):
    import torch
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    from vlp_codebook.datasets.collate import vlp_collate
    from vlp_codebook.engine.checkpoint import checkpoint_loading
    from vlp_codebook.datasets.synthetic_shapes import SyntheticShapesDataset
    from vlp_codebook.evaluation.itm_rerank import itm_rerank
    from vlp_codebook.evaluation.retrieval import retrieval_recalls
    from vlp_codebook.registry import MODELS

    work_dir, _ = trained
    ckpt = osp.join(work_dir, 'epoch_2.pth')
    metrics = test_tool.main([DEMO, ckpt, '--work-dir', work_dir, '--cfg-options', *SMALL,
                              'test_cfg.type=ITMRerankTestLoop', 'test_cfg.k=5'])

    # The same evaluation by hand: embeddings from predict, ITM from raw inputs per pair.
    cfg = Config.fromfile(DEMO)
    model = MODELS.build(cfg.model).eval()
    with checkpoint_loading():   # mmengine's loader cannot read the message hub's buffers alone
        load_checkpoint(model, ckpt, map_location='cpu')
    data = SyntheticShapesDataset(num_images=10, split='test', image_size=32)
    inputs = model.data_preprocessor(vlp_collate([data[i] for i in range(10)]), False)
    outputs = model(**inputs, mode='predict')
    images = torch.stack([o['image_embed'] for o in outputs])
    texts = torch.cat([o['text_embeds'] for o in outputs])
    img2txt, start = [], 0
    for o in outputs:
        img2txt.append(list(range(start, start + o['text_embeds'].shape[0])))
        start += o['text_embeds'].shape[0]
    txt2img = {j: i for i, js in enumerate(img2txt) for j in js}

    def scorer(image_index, text_index):
        return model.itm_scores(inputs['images'][image_index], inputs['input_ids'][text_index],
                                inputs['attention_mask'][text_index])

    score_i2t, score_t2i = itm_rerank(images @ texts.T, scorer, k=5)
    expected = retrieval_recalls(score_i2t, img2txt, txt2img, (1, 5, 10), score_t2i)
    for key, value in expected.items():
        assert metrics[f'retrieval/{key}'] == pytest.approx(value, abs=1e-6), key


def _rerank_test_worker(rank, world, port, ckpt, out_dir):
    import json

    from ddp_utils import init_gloo
    init_gloo(rank, world, port)
    metrics = test_tool.main([DEMO, ckpt, '--work-dir', osp.join(out_dir, f'rank{rank}'), '--cfg-options',
                              *SMALL, 'test_cfg.type=ITMRerankTestLoop', 'test_cfg.k=5'])
    with open(osp.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(metrics, f)


def test_itm_rerank_test_loop_under_two_gloo_ranks_matches_one_process(trained, tmp_path):
    # The test loader's DefaultSampler shards the set (5 + 5 images); the loop embeds the whole
    # set on each rank and splits the ITM pairs, so both ranks report the one-process metrics.
    import json

    from ddp_utils import run_workers
    from vlp_codebook import dist

    work_dir, _ = trained
    ckpt = osp.join(work_dir, 'epoch_2.pth')
    single = test_tool.main([DEMO, ckpt, '--work-dir', str(tmp_path / 'single'), '--cfg-options', *SMALL,
                             'test_cfg.type=ITMRerankTestLoop', 'test_cfg.k=5'])
    run_workers(_rerank_test_worker, 2, ckpt, str(tmp_path), timeout=180)
    assert not dist.is_distributed()
    for rank in range(2):
        with open(tmp_path / f'rank{rank}.json') as f:
            metrics = json.load(f)
        assert metrics.keys() == single.keys()
        for key, value in single.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), (rank, key)
