"""LAVIS's own task/runner path with the CODIS models: setup_task -> build_model -> train_step,
RetrievalTask evaluation, the launcher, and the documented before/after YAML edit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lavis_helpers import TINY_RUN_CONFIG, lavis_config, retrieval_samples

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
CODIS_LOGGED = ['loss_code', 'loss_code_i2p', 'loss_code_t2p', 'loss_code_ot_v', 'loss_code_ot_t',
                'loss_i2i', 'loss_t2t', 'loss_itc', 'loss_itm']


def test_setup_task_build_model_train_step(lavis_plugin, data_env):
    from lavis import tasks
    cfg = lavis_config()
    task = tasks.setup_task(cfg)
    assert type(task).__name__ == 'CodisRetrievalTask'
    model = task.build_model(cfg)
    assert type(model) is lavis_plugin.CodisRetrieval
    assert model.codebook_loss.codebook.num_codewords == 16          # from the run YAML's block
    assert model.codis_image_queue.size == 16
    model.train()
    loss = task.train_step(model, retrieval_samples())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert sorted(task.last_loss_terms) == sorted(CODIS_LOGGED)
    assert all(v == v for v in task.last_loss_terms.values())      # no NaN
    loss.backward()
    assert model.codebook_loss.codebook.weight.grad.abs().sum() > 0


def test_lavis_own_retrieval_task_trains_the_codis_terms(lavis_plugin, data_env):
    """With LAVIS's plain ``retrieval`` task the terms are trained (inside ``loss``), only not logged."""
    from lavis import tasks
    cfg = lavis_config(options=['run.task=retrieval'])
    task = tasks.setup_task(cfg)
    assert type(task).__name__ == 'RetrievalTask'
    model = task.build_model(cfg)
    loss = task.train_step(model, retrieval_samples())
    loss.backward()
    assert model.codebook_loss.codebook.weight.grad.abs().sum() > 0


def test_pretrain_task_train_step(lavis_plugin):
    from lavis.common.registry import registry
    task = registry.get_task_class('codis_image_text_pretrain').setup_task(cfg=None)
    model = lavis_plugin.CodisPretrain.from_pretrained('tiny')
    samples = retrieval_samples()
    del samples['image_id']                                           # pretraining samples have none
    loss = task.train_step(model, samples)
    assert {'loss_mlm', 'loss_code_i2p', 'loss_i2i', 'loss_t2t'} <= set(task.last_loss_terms)
    loss.backward()
    assert model.codebook_loss.codebook.weight.grad.abs().sum() > 0


def test_retrieval_evaluation_on_tiny_dataset(lavis_plugin, data_env, tmp_path):
    from lavis import tasks
    from lavis.common.registry import registry
    from torch.utils.data import DataLoader
    cfg = lavis_config()
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)['coco_retrieval']
    test_set = datasets['test']
    assert len(test_set.image) == 4 and len(test_set.text) == 8
    model = task.build_model(cfg).eval()
    registry.register_path('output_dir', str(tmp_path))              # the runner does this
    loader = DataLoader(test_set, batch_size=4, collate_fn=test_set.collater)
    with torch.no_grad():
        result = task.evaluation(model, loader)
    for key in ('txt_r1', 'txt_r5', 'img_r1', 'img_r5', 'r_mean', 'agg_metrics'):
        assert 0.0 <= result[key] <= 100.0, key
    # 4 images: every image is within the top 5 of every caption
    assert result['img_r5'] == 100.0
    assert json.loads((tmp_path / 'evaluate.txt').read_text().splitlines()[-1])['img_r5'] == 100.0
    assert len(datasets['train']) == 8


def test_launcher_trains_with_lavis_runner(lavis_plugin, data_env, tmp_path):
    env = dict(os.environ, CODIS_DATA_DIR=str(data_env), OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (os.path.join(REPO, 'plugins'), env.get('PYTHONPATH')) if p)
    run = subprocess.run(
        [sys.executable, '-W', 'ignore', '-m', 'vlp_codebook_lavis.train', '--cfg-path', TINY_RUN_CONFIG,
         '--options', f'run.output_dir={tmp_path / "out"}'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (job_dir,) = (tmp_path / 'out').iterdir()
    records = [json.loads(line) for line in (job_dir / 'log.txt').read_text().splitlines()
               if line.startswith('{"train_') or line.startswith('{"val_')]
    train = next(r for r in records if 'train_loss' in r)
    for name in CODIS_LOGGED:
        assert float(train[f'train_{name}']) == float(train[f'train_{name}']), name   # logged, not NaN
    assert any('val_agg_metrics' in r for r in records)
    assert (job_dir / 'checkpoint_best.pth').is_file()
    assert 'loss terms: loss_code:' in run.stderr                      # per-iteration line
    state = torch.load(job_dir / 'checkpoint_best.pth', map_location='cpu', weights_only=False)['model']
    assert 'codebook_loss.codebook.weight' in state


def test_launcher_patches_lavis_runner_only_while_it_runs(lavis_plugin, data_env):
    import argparse

    import lavis.runners.runner_base as runner_base
    from vlp_codebook_lavis.train import CpuLoader, adapted_runner_module, build_config
    cfg = build_config(argparse.Namespace(cfg_path=TINY_RUN_CONFIG, options=['run.device=cpu']))
    cfg.run_cfg.distributed = False
    before = runner_base.dist, runner_base.PrefetchLoader
    with pytest.raises(RuntimeError, match='inside'):
        with adapted_runner_module(cfg):
            assert runner_base.PrefetchLoader is CpuLoader and runner_base.dist is not before[0]
            runner_base.dist.barrier()          # no process group: a no-op, not an error
            raise RuntimeError('inside')
    assert (runner_base.dist, runner_base.PrefetchLoader) == before


def test_launcher_rejects_codebook_block_on_plain_arch(lavis_plugin, data_env):
    import argparse

    from vlp_codebook_lavis.train import build_config
    with pytest.raises(ValueError, match="model.arch='albef_retrieval' ignores model.codebook_loss"):
        build_config(argparse.Namespace(cfg_path=TINY_RUN_CONFIG,
                                        options=['model.arch=albef_retrieval', 'model.model_type=coco']))


def test_documented_edit_of_lavis_own_config(lavis_plugin):
    """docs/lavis.md: LAVIS's ret_coco_ft.yaml + `arch: codis_retrieval` (+ `task: codis_retrieval`)."""
    from lavis.common.config import Config
    from lavis.common.registry import registry
    lavis_yaml = os.path.join(registry.get_path('library_root'), 'projects', 'albef', 'train', 'ret_coco_ft.yaml')
    before = OmegaConf.load(lavis_yaml)
    after = OmegaConf.merge(before, {'model': {'arch': 'codis_retrieval'}, 'run': {'task': 'codis_retrieval'}})
    merged = Config.build_model_config(after).model                  # what LAVIS's Config does
    lavis_merged = Config.build_model_config(before).model
    assert merged.arch == 'codis_retrieval' and merged.codebook_loss.num_codewords == 1024
    # the architecture keys are LAVIS's albef_retrieval coco defaults
    for key in ('queue_size', 'vit_type', 'image_size', 'med_config_path', 'embed_dim', 'temp', 'alpha',
                'momentum', 'max_txt_len', 'use_distill', 'load_finetuned'):
        assert merged[key] == lavis_merged[key], key
    # ALBEF's pretrained weights are the starting point, as with albef_retrieval
    assert merged.load_pretrained and merged.pretrained == lavis_merged.pretrained
    from lavis import tasks
    task_cfg = OmegaConf.create({'run_cfg': after.run})
    assert type(tasks.setup_task(task_cfg)).__name__ == 'CodisRetrievalTask'


def test_docs_quote_the_tiny_config_verbatim():
    with open(os.path.join(REPO, 'docs', 'lavis.md')) as f:
        doc = f.read()
    with open(TINY_RUN_CONFIG) as f:
        assert '```yaml\n' + f.read() + '```' in doc
