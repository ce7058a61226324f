"""Pictures of a run: scalars.json parsing, codebook health, the retrieval gallery, the hook that
draws at validation/end of training, and the plot tool that redraws from a work dir."""
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_codis_model import CONFIGS
from vlp_codebook.analysis import plots
from vlp_codebook.analysis.codebook_health import codebook_health
from vlp_codebook.analysis.gallery import retrieval_gallery
from vlp_codebook.analysis.scalars import find_scalars, read_scalars

ROOT = osp.dirname(CONFIGS)
FIXTURES = osp.join(ROOT, 'tests', 'fixtures')


def _write_lines(path, records):
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as handle:
        handle.write('\n'.join(json.dumps(r) for r in records) + '\n')


def test_scalars_are_split_into_train_val_and_codebook_lines(tmp_path):
    path = str(tmp_path / 'scalars.json')
    _write_lines(path, [
        dict(lr=1e-3, loss=3.0, loss_itm=0.7, epoch=1, iter=2, step=2),
        dict(lr=1e-3, loss=2.0, loss_itm=0.6, epoch=1, iter=4, step=4),
        {'codebook/dead_codewords': 3, 'codebook/usage_perplexity': 50.0, 'epoch': 1, 'iter': 4, 'step': 4},
        {'retrieval/txt_r1': 10.0, 'retrieval/img_r1': 5.0, 'step': 1},
        # a resumed run repeats iteration 4: the later value wins
        dict(lr=1e-3, loss=1.5, loss_itm=0.5, epoch=1, iter=4, step=4),
    ])
    log = read_scalars(path)
    assert len(log.train) == 3 and len(log.val) == 1 and len(log.codebook) == 1
    assert log.series('train', 'loss') == ([2, 4], [3.0, 1.5])
    assert log.series('codebook', 'codebook/dead_codewords', x='epoch') == ([1], [3])
    assert log.series('val', 'retrieval/txt_r1') == ([1], [10.0])
    assert [k for k in log.keys('train') if k.startswith('loss')] == ['loss', 'loss_itm']


def test_bad_scalars_files_are_named(tmp_path):
    path = tmp_path / 'scalars.json'
    path.write_text('{"loss": 1, "iter": 1, "step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r'scalars.json, line 2: not JSON'):
        read_scalars(str(path))
    (tmp_path / 'empty_dir').mkdir()
    with pytest.raises(FileNotFoundError, match='no vis_data/scalars.json under'):
        find_scalars(str(tmp_path / 'empty_dir'))
    with pytest.raises(FileNotFoundError, match='nowhere'):
        find_scalars(str(tmp_path / 'nowhere'))


def test_find_scalars_takes_the_latest_run_of_a_work_dir(tmp_path):
    for run in ('20260101_000000', '20260102_000000'):
        _write_lines(str(tmp_path / run / 'vis_data' / 'scalars.json'), [dict(loss=1.0, iter=1, step=1)])
    latest = str(tmp_path / '20260102_000000' / 'vis_data' / 'scalars.json')
    assert find_scalars(str(tmp_path)) == latest
    assert find_scalars(str(tmp_path / '20260102_000000')) == latest
    assert find_scalars(latest) == latest


def test_codebook_health_counts_dead_codewords_and_perplexity():
    usage = torch.tensor([0.25, 0.25, 0.25, 0.25 - 2e-4, 1e-4, 1e-4, 0.0, 0.0])
    health = codebook_health(usage)                 # dead: below 1 % of 1/8
    assert health['codebook/dead_codewords'] == 4
    assert health['codebook/num_codewords'] == 8
    assert health['codebook/usage_perplexity'] == pytest.approx(4.0, rel=2e-3)
    assert codebook_health(torch.full((5,), 3.0))['codebook/usage_perplexity'] == pytest.approx(5.0)
    # below 5e-4 / 8 = 6.25e-5: only the two empty codewords
    assert codebook_health(usage, dead_fraction=5e-4)['codebook/dead_codewords'] == 2
    with pytest.raises(ValueError, match='usage must be'):
        codebook_health(torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match='dead_fraction'):
        codebook_health(usage, dead_fraction=0.0)


def _green_pixels(path):
    pixels = np.asarray(Image.open(path).convert('RGB')).reshape(-1, 3).astype(int)
    return int((np.abs(pixels - np.array([0x1a, 0x98, 0x50])).sum(1) < 30).sum())


def test_gallery_frames_only_the_correct_image(tmp_path):
    images = [torch.full((3, 8, 8), v) for v in (0.1, 0.5, 0.9)]
    query = dict(text='a red circle', images=images, scores=[0.9, 0.5, 0.1], rank=1)
    with_hit = plots.plot_gallery([dict(query, correct=[False, True, False])], str(tmp_path / 'hit.png'))
    without = plots.plot_gallery([dict(query, correct=[False] * 3, rank=7)], str(tmp_path / 'miss.png'))
    assert _green_pixels(with_hit) > 200 and _green_pixels(without) == 0


@pytest.fixture(scope='module')
def tiny_model_and_set():
    from test_codis_model import tiny_model
    from vlp_codebook.datasets.synthetic_shapes import SyntheticShapesDataset
    model = tiny_model(osp.join(CONFIGS, 'codis_demo.py')).train()
    return model, SyntheticShapesDataset(num_images=12, split='test', image_size=32)


def test_retrieval_gallery_lists_each_querys_top_images_by_similarity(tiny_model_and_set):
    model, dataset = tiny_model_and_set
    queries = retrieval_gallery(model, dataset, num_images=12, num_queries=3, top_k=5, batch_size=5)
    assert model.training                                  # mode restored
    # independent scores: the model's predict outputs over the whole set
    from vlp_codebook.datasets.collate import vlp_collate
    model.eval()
    with torch.no_grad():
        out = model(**model.data_preprocessor(vlp_collate([dataset[i] for i in range(12)]), False), mode='predict')
    model.train()
    images = torch.nn.functional.normalize(torch.stack([o['image_embed'] for o in out]), dim=1)
    assert [q['text'] for q in queries] == [dataset[i]['texts'][0] for i in (0, 4, 8)]
    for owner, query in zip((0, 4, 8), queries):
        text = torch.nn.functional.normalize(out[owner]['text_embeds'][0], dim=0)
        scores = images @ text
        order = scores.argsort(descending=True)[:5].tolist()
        shown = [next(i for i in range(12) if torch.equal(dataset[i]['image'], image)) for image in query['images']]
        assert shown == order
        assert query['correct'] == [i == owner for i in order]
        torch.testing.assert_close(torch.tensor(query['scores']), scores[order], rtol=1e-4, atol=1e-5)
        assert query['rank'] == int((scores >= scores[owner]).sum()) - 1      # ties count against it
    with pytest.raises(ValueError, match="needs retrieval items with 'image' and 'texts'"):
        from vlp_codebook.datasets.synthetic_shapes import SyntheticShapesDataset
        retrieval_gallery(model, SyntheticShapesDataset(num_images=4, split='train'), num_images=4)


SMALL = ['train_dataloader.dataset.num_images=12', 'train_dataloader.batch_size=8',
         'val_dataloader.dataset.num_images=10', 'val_dataloader.batch_size=5',
         'train_cfg.max_epochs=3', 'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=3',
         'default_hooks.logger.interval=2', 'model.queue_size=32', 'model.alpha_warmup_iters=4',
         'param_scheduler.0.end=2', 'param_scheduler.1.end=3']


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """The demo config, 3 epochs of 3 iterations, validation after epochs 2 and 3."""
    from vlp_codebook.tools import train as train_tool
    work_dir = str(tmp_path_factory.mktemp('plots_demo'))
    calls = []
    original = plots.plot_run

    def spy(log, out_dir, **kwargs):
        calls.append((len(log.val), len(log.codebook), kwargs.get('gallery') is not None))
        return original(log, out_dir, **kwargs)

    plots.plot_run = spy
    try:
        runner = train_tool.main([osp.join(CONFIGS, 'codis_demo.py'), '--work-dir', work_dir, '--cfg-options', *SMALL])
    finally:
        plots.plot_run = original
    return work_dir, runner, calls


def test_hook_draws_at_each_validation_with_that_validations_metrics(demo_run):
    work_dir, runner, calls = demo_run
    # two validations (epochs 2 and 3); the one at the end of training is not drawn twice.
    # At each, the log already holds that validation's line and one codebook line per epoch.
    assert calls == [(1, 2, True), (2, 3, True)]
    for name in ('losses', 'retrieval', 'codebook', 'gallery'):
        with Image.open(osp.join(work_dir, 'plots', f'{name}.png')) as image:
            assert image.width > 300 and image.height > 200


def test_hook_logs_the_codebooks_health_from_its_usage_buffer(demo_run):
    work_dir, runner, _ = demo_run
    log = read_scalars(find_scalars(work_dir))
    assert log.series('codebook', 'codebook/dead_codewords', x='epoch')[0] == [1, 2, 3]
    assert log.series('codebook', 'codebook/dead_codewords', x='iter')[0] == [3, 6, 9]
    usage = runner.model.codebook_loss.codebook.usage
    expected = codebook_health(usage)
    final = log.codebook[-1]
    assert final['codebook/dead_codewords'] == expected['codebook/dead_codewords']
    assert final['codebook/usage_perplexity'] == pytest.approx(expected['codebook/usage_perplexity'])
    with open(osp.join(work_dir, 'plots', 'codebook_usage.json')) as handle:
        saved = json.load(handle)
    assert saved['epoch'] == 3 and np.allclose(saved['usage'], usage.tolist())
    # the usage has moved away from its uniform start (the buffer is the one training updates)
    assert not np.allclose(saved['usage'], 1.0 / usage.numel())


def test_plot_tool_redraws_a_work_dir(demo_run, tmp_path):
    from vlp_codebook.tools import plot as plot_tool
    work_dir, runner, _ = demo_run
    out = tmp_path / 'again'
    # the gallery's model comes from a config the user names (nothing in the work dir is built)
    assert 'gallery.png' not in [osp.basename(p) for p in plot_tool.main([work_dir, '--out', str(tmp_path / 'no')])]
    written = plot_tool.main([work_dir, '--out', str(out), '--gallery-images', '6',
                              '--config', osp.join(CONFIGS, 'codis_demo.py'), '--cfg-options', *SMALL])
    assert sorted(osp.basename(p) for p in written) == ['codebook.png', 'gallery.png', 'losses.png', 'retrieval.png']
    assert all(osp.getsize(p) > 1000 for p in written)
    with pytest.raises(FileNotFoundError, match='nope'):
        plot_tool.main([str(tmp_path / 'nope')])


def test_plot_tool_reads_the_usage_from_the_checkpoint_without_the_hooks_file(demo_run, tmp_path):
    from vlp_codebook.tools.plot import _usage
    work_dir, runner, _ = demo_run
    from_checkpoint = _usage(str(tmp_path / 'no_plots_here'), osp.join(work_dir, 'epoch_3.pth'), trust=False)
    assert np.allclose(from_checkpoint, runner.model.codebook_loss.codebook.usage.tolist())


def test_mim_entry_forwards_to_the_plot_tool(demo_run, tmp_path):
    work_dir, _, _ = demo_run
    script = osp.join(ROOT, 'vlp_codebook', '.mim', 'tools', 'plot.py')
    result = subprocess.run([sys.executable, script, work_dir, '--out', str(tmp_path), '--no-gallery'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ['codebook.png', 'losses.png', 'retrieval.png']


def test_hook_draws_at_the_end_of_training_without_validation(tmp_path):
    # The toy regressor: no codebook, no retrieval, no validation: only the losses are drawn, once.
    from vlp_codebook.tools import train as train_tool
    config = tmp_path / 'toy_plots.py'
    config.write_text(f"_base_ = [{osp.join(FIXTURES, 'toy_config.py')!r}]\n"
                      "custom_hooks = [dict(type='TrainingPlotsHook')]\n"
                      "val_dataloader = None\nval_evaluator = None\nval_cfg = None\n"
                      "train_cfg = dict(val_interval=100)\n")
    sys.path.insert(0, FIXTURES)
    try:
        train_tool.main([str(config), '--work-dir', str(tmp_path / 'work')])
    finally:
        sys.path.remove(FIXTURES)
    assert sorted(os.listdir(tmp_path / 'work' / 'plots')) == ['losses.png']
