"""The entry point trains a tiny open_clip model from scratch with the codebook through
open_clip_train's own loop, on real emoji image-caption pairs; resume, export and bad flags."""
from __future__ import annotations

import glob
import os.path as osp
import pickle
import re

import pytest
import torch

from openclip_helpers import run_entry_point

EPOCHS = 3      # 8 steps of 32 pairs per epoch: 24 steps


def _train_args(csv, logs, name, *extra):
    return ('--model', 'codis-tiny-vit', '--train-data', csv, '--dataset-type', 'csv', '--csv-separator', '\t',
            '--batch-size', '32', '--epochs', str(EPOCHS), '--workers', '0', '--lr', '2e-3', '--warmup', '2',
            '--precision', 'fp32', '--seed', '0', '--log-every-n-steps', '2', '--logs', str(logs), '--name', name,
            '--report-to', 'tensorboard', '--save-frequency', '1',
            '--codebook-size', '64', '--codebook-plan-features', 'teacher', '--codis-intra', '--queue-size', '64',
            *extra)     # the codebook's defaults: a plan queue of K = 64 rows, a warm-up of one epoch (8 steps)


@pytest.fixture(scope='module')
def trained(openclip_plugin, emoji_csv, tmp_path_factory):
    logs = tmp_path_factory.mktemp('openclip_logs')
    proc = run_entry_point(*_train_args(emoji_csv, logs, 'full'))
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = logs / 'full'
    return dict(logs=logs, run=run, csv=emoji_csv, log=(run / 'out.log').read_text(), stderr=proc.stderr,
                stdout=proc.stdout)


def _epoch_means(log: str, term: str):
    """The running mean of ``term`` at the last logged step of each epoch."""
    means = {}
    for line in log.splitlines():
        epoch = re.search(r'Train Epoch: (\d+)', line)
        value = re.search(rf'{term}: [0-9.e+-]+ \(([0-9.e+-]+)\)', line)
        if epoch and value:
            means[int(epoch.group(1))] = float(value.group(1))
    return [means[e] for e in sorted(means)]


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_codebook_terms_are_logged_by_open_clip_and_tensorboard(trained):
    for term in ('Contrastive_loss', 'Codebook_i2p', 'Codebook_t2p', 'Codebook_ot_v', 'Codebook_ot_t',
                 'Intra_i2i', 'Intra_t2t'):
        assert f'{term}:' in trained['log'], term
    assert re.search(r'codebook step \d+: codebook_usage_perplexity [0-9.]+', trained['log'])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(trained['run'] / 'tensorboard'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/codebook_i2p', 'train/intra_t2t', 'train/contrastive_loss',
            'train/codebook_usage_perplexity', 'train/code_plan_perplexity'} <= tags
    perplexity = [e.value for e in events.Scalars('train/codebook_usage_perplexity')]
    assert len(perplexity) >= EPOCHS and all(1.0 <= p <= 64.0 for p in perplexity)


def test_console_shows_progress_and_the_log_file_everything(trained):
    console = trained['stderr']
    assert 'Train Epoch: 0' in console and 'codebook step' in console
    assert 'Params:' not in console and 'VisionTransformer(' not in console     # model printout: log only
    assert 'Params:' in trained['log'] and 'VisionTransformer(' in trained['log']
    assert 'TorchDynamo' not in console and 'out.log' in trained['stdout']
    assert 'the codebook terms are 0 for the first 8 steps (one epoch)' in console


def test_the_losses_fall_after_the_one_epoch_codebook_warmup(trained):
    contrastive = _epoch_means(trained['log'], 'Contrastive_loss')
    assert len(contrastive) == EPOCHS and contrastive[-1] < contrastive[0] - 0.05, contrastive
    for term in ('Codebook_i2p', 'Codebook_t2p'):     # zero through epoch 0 (the default warm-up), then on
        means = _epoch_means(trained['log'], term)
        assert means[0] == 0.0 and means[1] > 0.5 and means[-1] < means[1], (term, means)
    total = _epoch_means(trained['log'], 'Loss')      # the codebook terms join it after epoch 0
    assert total[1] > total[0] and total[-1] < total[1], total


def test_codebook_and_teacher_move_and_checkpoints_are_data(trained):
    checkpoints = trained['run'] / 'checkpoints'
    first, last = _load(checkpoints / 'epoch_1.pt'), _load(checkpoints / f'epoch_{EPOCHS}.pt')
    key = 'codebook_loss.codebook.weight'
    a, b = first['state_dict'][key], last['state_dict'][key]
    angle = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert (angle < 1 - 1e-6).float().mean() > 0.9          # nearly every codeword turned
    # the EMA teacher follows the student, without being equal to it
    student = last['state_dict']['clip.text_projection']
    teacher = last['state_dict']['teacher.module.text_projection']
    assert not torch.equal(student, teacher)
    assert torch.equal(last['state_dict']['teacher.num_updates'], torch.tensor(8 * EPOCHS))
    assert int(last['state_dict']['image_queue.num_valid']) == 64
    assert int(last['state_dict']['codebook_loss.plan_queues.text.num_valid']) == 64
    assert int(last['state_dict']['codebook_loss.num_steps']) == 8 * EPOCHS      # the warm-up's step count
    # open_clip's AdamW groups (its --wd default 0.2) plus the codewords' own, undecayed
    # (--codebook-wd 0, the default)
    groups = last['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [0.0, 0.2, 0.0] and len(groups[-1]['params']) == 1


def test_resume_is_exact(trained):
    checkpoints = trained['run'] / 'checkpoints'
    proc = run_entry_point(*_train_args(trained['csv'], trained['logs'], 'resumed', '--resume',
                                        str(checkpoints / 'epoch_2.pt')))
    assert proc.returncode == 0, proc.stderr[-4000:]
    uninterrupted = _load(checkpoints / f'epoch_{EPOCHS}.pt')
    resumed = _load(trained['logs'] / 'resumed' / 'checkpoints' / f'epoch_{EPOCHS}.pt')
    assert uninterrupted['state_dict'].keys() == resumed['state_dict'].keys()
    for key, value in uninterrupted['state_dict'].items():
        assert torch.equal(value, resumed['state_dict'][key]), key
    for group_a, group_b in zip(uninterrupted['optimizer']['state'].values(), resumed['optimizer']['state'].values()):
        for name in group_a:
            assert torch.equal(group_a[name], group_b[name]), name


def test_resume_with_another_codebook_size_names_the_flag(trained):
    checkpoints = trained['run'] / 'checkpoints'
    args = list(_train_args(trained['csv'], trained['logs'], 'wrong_size', '--resume', str(checkpoints / 'epoch_2.pt')))
    args[args.index('--codebook-size') + 1] = '32'
    proc = run_entry_point(*args)
    assert proc.returncode == 1
    assert 'error: ValueError' in proc.stderr and '--codebook-size' in proc.stderr
    assert 'Traceback' not in proc.stderr                      # one line, as the other tools


def test_export_loads_in_plain_open_clip(trained, tmp_path):
    import open_clip

    from vlp_codebook_openclip import CodebookCLIP
    from vlp_codebook_openclip.export import main as export_main
    source = trained['run'] / 'checkpoints' / f'epoch_{EPOCHS}.pt'
    out = tmp_path / 'plain.pt'
    export_main([str(source), str(out)])
    exported = _load(out)['state_dict']
    assert not any(k.startswith(('codebook_loss', 'teacher', 'image_queue', 'clip.')) for k in exported)
    plain, _, _ = open_clip.create_model_and_transforms('codis-tiny-vit', pretrained=str(out))
    clip, _, _ = open_clip.create_model_and_transforms('codis-tiny-vit', output_dict=True)
    wrapped = CodebookCLIP(clip, codebook_size=64, plan_features='teacher', intra=True, queue_size=64)
    wrapped.load_state_dict(_load(source)['state_dict'])
    images = torch.randn(3, 3, 32, 32)
    plain.eval(), wrapped.eval()
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), wrapped.encode_image(images))
    # never the untrained init: the trained weights differ from a fresh model's
    fresh, _, _ = open_clip.create_model_and_transforms('codis-tiny-vit')
    assert not torch.equal(fresh.state_dict()['text_projection'], plain.state_dict()['text_projection'])


def test_checkpoint_reader_refuses_code(openclip_plugin, tmp_path):
    from vlp_codebook_openclip.train import load_checkpoint_data
    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), 'w'))

    path = tmp_path / 'evil.pt'
    torch.save({'state_dict': {}, 'x': Payload()}, path)
    with pytest.raises(pickle.UnpicklingError) as error:   # ours, with the opt-in (not torch's "retry ...")
        load_checkpoint_data(str(path))
    assert not marker.exists()
    assert 'io.open' in str(error.value) and 'VLP_CODEBOOK_TRUST_CHECKPOINTS=1' in str(error.value)
    assert 'weights_only=False' not in str(error.value)
    with pytest.MonkeyPatch.context() as patch:   # the opt-in unpickles (so the refusal above is what stopped it)
        patch.setenv('VLP_CODEBOOK_TRUST_CHECKPOINTS', '1')
        load_checkpoint_data(str(path))
    assert marker.exists()


@pytest.mark.parametrize('epoch', [-1, '3', 2.0, True])
def test_resume_refuses_an_epoch_that_is_not_a_count(openclip_plugin, tmp_path, epoch):
    """open_clip resumes its epoch loop from the file's ``epoch`` and prunes ``epoch_{N}.pt`` by it."""
    from vlp_codebook.checkpoint_io import UntrustedCheckpointError
    from vlp_codebook_openclip.train import load_checkpoint_data
    path = tmp_path / 'epoch_3.pt'
    torch.save({'epoch': epoch, 'state_dict': {}}, path)
    with pytest.raises(UntrustedCheckpointError, match='"epoch" is'):
        load_checkpoint_data(str(path))
    torch.save({'epoch': 3, 'state_dict': {}}, path)
    assert load_checkpoint_data(str(path))['epoch'] == 3


@pytest.mark.parametrize('name', ['bomb.pt', 'bomb.ckpt', 'bomb'])
def test_pretrained_file_is_read_against_the_schema(openclip_plugin, tmp_path, name):
    """--pretrained FILE, whatever its name (open_clip torch.loads every suffix but .safetensors and
    numpy's): a zero-stride tensor (a memory bomb when expanded; torch's weights_only builds it) is
    refused inside open_clip's own loader, naming the file."""
    import open_clip_train.main as oc_main

    from vlp_codebook_openclip.options import parse_codebook_args
    from vlp_codebook_openclip.train import injected
    path = tmp_path / name
    torch.save({'state_dict': {'visual.proj': torch.zeros(1).expand(1000, 1000)}}, path)
    options, _ = parse_codebook_args(['--codebook-size', '16'])
    with injected(options), pytest.raises(Exception) as error:
        oc_main.create_model_and_transforms('codis-tiny-vit', str(path), output_dict=True)
    assert str(path) in str(error.value) and 'stride' in str(error.value)


def test_pretrained_file_is_read_once(openclip_plugin, tmp_path, monkeypatch):
    """A good --pretrained file is read once, by the schema reader (torch's own loader never sees
    it), and its weights reach the model."""
    import open_clip
    import open_clip_train.main as oc_main

    import vlp_codebook.checkpoint_io as checkpoint_io
    from vlp_codebook_openclip.options import parse_codebook_args
    from vlp_codebook_openclip.train import injected
    source, _, _ = open_clip.create_model_and_transforms('codis-tiny-vit')
    path = tmp_path / 'weights.bin'
    torch.save({'state_dict': source.state_dict()}, path)
    reads = []
    real_read = checkpoint_io.read_checkpoint
    monkeypatch.setattr(checkpoint_io, 'read_checkpoint', lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    torch_reads = []
    real_torch_load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **k: torch_reads.append(a[0]) or real_torch_load(*a, **k))
    options, _ = parse_codebook_args(['--codebook-size', '16'])
    with injected(options):
        model, _, _ = oc_main.create_model_and_transforms('codis-tiny-vit', str(path), output_dict=True)
    assert [str(r) for r in reads] == [str(path)] and torch_reads == []
    assert torch.equal(model.clip.text_projection, source.text_projection)


def test_a_warmup_as_long_as_the_run_is_named(openclip_plugin, emoji_csv, tmp_path):
    """--epochs 1 with the default one-epoch warm-up: the codebook would never train; the console says so."""
    args = list(_train_args(emoji_csv, tmp_path, 'one_epoch'))
    args[args.index('--epochs') + 1] = '1'
    proc = run_entry_point(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'the codebook warm-up (8 steps) lasts the whole run (1 epochs of 8 steps)' in proc.stderr


@pytest.mark.parametrize('argv, message', [
    (['--codebook-size', '0'], '--codebook-size must be a positive integer, got 0'),
    (['--codebook-weight', 'nan'], '--codebook-weight must be a finite number >= 0'),
    (['--codebook-weight', '0'], '--codebook-weight 0 is only meaningful with --codis-intra'),
    (['--codebook-wd', '-1'], '--codebook-wd must be a finite number >= 0, got -1'),
    (['--codebook-plan-queue', '-5'], '--codebook-plan-queue must be an integer >= 0, got -5'),
    (['--codebook-warmup-steps', 'x'], "--codebook-warmup-steps must be an integer >= 0, got 'x'"),
    (['--no-codebook', '--codebook-wd', '0'], 'drop --codebook-wd'),
    (['--codis-intra'], '--codis-intra needs --queue-size'),
    (['--queue-size', '16'], '--queue-size is only used by --codis-intra'),
    (['--codis-momentum', '1.5'], '--codis-momentum must be in [0, 1]'),
    (['--no-codebook', '--codis-intra', '--queue-size', '8'], '--no-codebook trains without the CODIS terms'),
])
def test_bad_flags_name_the_flag(openclip_plugin, capsys, argv, message):
    from vlp_codebook_openclip.options import parse_codebook_args
    with pytest.raises(SystemExit) as exit_info:
        parse_codebook_args(argv + ['--model', 'codis-tiny-vit'])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unsupported_open_clip_settings_are_refused_by_name(openclip_plugin, emoji_csv, tmp_path):
    from vlp_codebook_openclip.train import main
    with pytest.raises(SystemExit, match='--accum-freq'):
        main(['--model', 'codis-tiny-vit', '--train-data', emoji_csv, '--dataset-type', 'csv',
              '--csv-separator', '\t', '--accum-freq', '2', '--logs', str(tmp_path), '--workers', '0'])
    assert not glob.glob(osp.join(tmp_path, '*', 'checkpoints', '*.pt'))


def test_torchrun_two_cpu_processes_train_through_the_entry_point(openclip_plugin, emoji_csv, tmp_path):
    """torchrun + gloo on CPU (open_clip_train alone passes device_ids=[cpu] to DDP, which torch
    refuses), with --local-loss --gather-with-grad, --precision amp_bf16 and the intra directions."""
    import os
    import subprocess
    import sys

    from ddp_utils import free_port
    from openclip_helpers import ROOT
    torchrun = osp.join(osp.dirname(sys.executable), 'torchrun')
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([osp.join(ROOT, 'plugins'), ROOT, os.environ.get('PYTHONPATH', '')]))
    # torchrun reads a bare --logs as its own --logs-specs: run where logs/ should go instead
    proc = subprocess.run(
        [torchrun, '--nproc_per_node', '2', '--master-port', str(free_port()), '-m', 'vlp_codebook_openclip.train',
         '--model', 'codis-tiny-vit', '--train-data', emoji_csv, '--dataset-type', 'csv', '--csv-separator', '\t',
         '--batch-size', '16', '--epochs', '1', '--workers', '0', '--precision', 'amp_bf16', '--dist-backend', 'gloo',
         '--local-loss', '--gather-with-grad', '--name', 'ddp', '--codebook-size', '32', '--codis-intra',
         '--queue-size', '48', '--lr', '1e-3', '--warmup', '1', '--log-every-n-steps', '4'],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (tmp_path / 'logs' / 'ddp' / 'out.log').read_text()
    assert 'Running in distributed mode' in log and 'total 2' in log
    assert 'Codebook_i2p' in log and 'Intra_t2t' in log
    state = _load(tmp_path / 'logs' / 'ddp' / 'checkpoints' / 'epoch_1.pt')['state_dict']
    # DDP saves the wrapped model: module.* keys; the queue holds joint batches (2 x 16 per step)
    assert int(state['module.image_queue.num_valid']) == 48
    assert int(state['module.teacher.num_updates']) == 256 // 32
