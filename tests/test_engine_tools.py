"""The train/test tools and engine pieces, run on a toy model (tests/fixtures/toy_modules.py).

One uninterrupted 8-iteration training run (checkpoints + validation at 4 and 8) is shared by
the tests; resumed runs are compared with it.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / 'fixtures'
TOY_CONFIG = str(FIXTURES / 'toy_config.py')
REPO = Path(__file__).resolve().parents[1]
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

from mmengine.logging import MessageHub  # noqa: E402
from mmengine.runner import CheckpointLoader  # noqa: E402
from mmengine.runner import checkpoint as mmengine_checkpoint  # noqa: E402

import vlp_codebook.engine  # noqa: E402,F401
from vlp_codebook.engine import config as config_module  # noqa: E402
from vlp_codebook.checkpoint_io import read_checkpoint  # noqa: E402
from vlp_codebook.engine.checkpoint import checkpoint_loading, load_from_safe_local  # noqa: E402
from vlp_codebook.engine.distributed import cpu_model_wrapper_cfg, init_cpu_process_group, setup_launcher  # noqa: E402
from vlp_codebook.engine.hooks import ModelScalarsLoggerHook  # noqa: E402
from vlp_codebook.engine.optim_wrapper import BF16AutocastOptimWrapper  # noqa: E402
from vlp_codebook.tools import test as test_tool  # noqa: E402
from vlp_codebook.tools import train as train_tool  # noqa: E402

MAX_ITERS = 8


def train_losses(runner):
    """The logged per-iteration total losses, oldest first (resumed runs include the restored ones)."""
    values, _ = runner.message_hub.get_scalar('train/loss').data
    return np.asarray(values, dtype=np.float64)


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
    """The uninterrupted reference run."""
    work_dir = tmp_path_factory.mktemp('full_run')
    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(work_dir)])
    return SimpleNamespace(runner=runner, work_dir=work_dir, losses=train_losses(runner))


# ---------------------------------------------------------------- checkpoint loader

def test_our_checkpoint_loader_is_scoped_and_needed(full_run):
    checkpoint = str(full_run.work_dir / 'iter_4.pth')
    # importing vlp_codebook.engine leaves mmengine's loader alone ...
    assert CheckpointLoader._get_checkpoint_loader(checkpoint) is mmengine_checkpoint.load_from_local
    # ... which reads the plain data of our checkpoints, but not as HistoryBuffers (a resume would
    # skip them): the message hub is saved as plain lists
    plain = mmengine_checkpoint.load_from_local(checkpoint, map_location='cpu')['message_hub']['log_scalars']
    assert set(plain['train/loss']) == {'log', 'count', 'max_length'}
    with checkpoint_loading():
        assert CheckpointLoader._get_checkpoint_loader(checkpoint) is load_from_safe_local
        with checkpoint_loading(trust=True):   # nested blocks restore the outer one
            pass
        assert CheckpointLoader._get_checkpoint_loader(checkpoint) is load_from_safe_local
        loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    assert CheckpointLoader._get_checkpoint_loader(checkpoint) is mmengine_checkpoint.load_from_local
    assert loaded['meta']['iter'] == 4
    assert {'state_dict', 'optimizer', 'message_hub', 'param_schedulers'} <= set(loaded)
    # the message hub's buffers come back as HistoryBuffers with their statistics methods
    buffer = loaded['message_hub']['log_scalars']['train/loss']
    assert buffer.mean(4) == pytest.approx(float(np.mean(full_run.losses[:4])), rel=1e-6)


def test_checkpoint_loader_missing_file_names_the_path(tmp_path):
    missing = tmp_path / 'nope' / 'iter_3.pth'
    with pytest.raises(FileNotFoundError, match=str(missing)), checkpoint_loading():
        CheckpointLoader.load_checkpoint(str(missing))
    with pytest.raises(FileNotFoundError, match='directory'):
        read_checkpoint(str(tmp_path))


# ---------------------------------------------------------------- training run + hooks

def test_training_writes_checkpoints_and_runs_the_hooks(full_run):
    assert sorted(p.name for p in full_run.work_dir.glob('*.pth')) == ['iter_4.pth', 'iter_8.pth']
    assert len(full_run.losses) == MAX_ITERS and np.isfinite(full_run.losses).all()
    model = full_run.runner.model
    # The model's own training forward: one EMA update per iteration, α ramped from its step buffer
    assert model.momentum_updates == MAX_ITERS and int(model.num_steps) == MAX_ITERS
    # ModelScalarsLoggerHook: the scalars reach the message hub and the log's scalars.json
    hub = full_run.runner.message_hub
    assert hub.get_scalar('train/toy_alpha').current() == pytest.approx((MAX_ITERS - 1) / MAX_ITERS)
    # logged after the EMA update of the last iteration: the final teacher's norm
    assert hub.get_scalar('train/toy_teacher_norm').current() == pytest.approx(
        float(model.teacher[0].weight.norm()), rel=1e-6)
    scalars_files = list(full_run.work_dir.glob('*/vis_data/scalars.json'))
    assert len(scalars_files) == 1
    records = [json.loads(line) for line in scalars_files[0].read_text().splitlines()]
    logged_alpha = [r['toy_alpha'] for r in records if 'toy_alpha' in r]
    assert logged_alpha == pytest.approx([i / MAX_ITERS for i in range(MAX_ITERS)])


def test_unknown_model_type_lists_known_types(tmp_path):
    with pytest.raises(KeyError) as error:
        train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path), '--cfg-options', 'model.type=ToyRegresor'])
    message = error.value.args[0]
    assert "type='ToyRegresor'" in message
    assert "Did you mean 'ToyRegressor'" in message
    assert 'Known types:' in message and 'ToyRegressor' in message.split('Known types:')[1]


@pytest.mark.parametrize('option, wrong, right', [
    ('train_dataloader.dataset.type=ToyRegresionDataset', 'ToyRegresionDataset', 'ToyRegressionDataset'),
    ('val_evaluator.type=ToyMSEMetrik', 'ToyMSEMetrik', 'ToyMSEMetric'),
    ('default_hooks.checkpoint.type=CheckpointHok', 'CheckpointHok', 'CheckpointHook'),
])
def test_unknown_types_elsewhere_list_known_types(tmp_path, option, wrong, right):
    with pytest.raises(KeyError) as error:
        train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path), '--cfg-options', option])
    message = error.value.args[0]
    assert f"type={wrong!r}" in message and f"Did you mean {right!r}" in message
    assert right in message.split('Known types:')[1]


def test_unknown_config_name_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        train_tool.main(['no_such_config_xyz'])
    message = str(error.value)
    assert str(tmp_path / 'no_such_config_xyz') in message
    assert str(config_module.shipped_configs_dir() / 'no_such_config_xyz.py') in message


def test_shipped_config_names_resolve(tmp_path, monkeypatch):
    shipped = tmp_path / 'shipped'
    (shipped / 'ablations').mkdir(parents=True)
    (shipped / '_base_').mkdir()
    (shipped / 'ablations' / 'row_a.py').write_text('x = 1\n')
    (shipped / '_base_' / 'runtime.py').write_text('y = 2\n')
    monkeypatch.setattr(config_module, 'shipped_configs_dir', lambda: shipped)
    monkeypatch.chdir(tmp_path)
    target = (shipped / 'ablations' / 'row_a.py').resolve()
    for name in ('ablations/row_a', 'ablations/row_a.py', 'configs/ablations/row_a.py'):
        assert config_module.resolve_config(name) == target
    assert config_module.list_shipped_configs() == ['ablations/row_a']
    cfg = config_module.load_config('ablations/row_a', cfg_options={'x': 3})
    assert (cfg.x, cfg.default_scope) == (3, 'vlp_codebook')


def test_packaged_configs_are_the_repository_configs():
    shipped = config_module.shipped_configs_dir()
    assert shipped.is_dir(), f'{shipped} missing: vlp_codebook/.mim/configs must link to configs/'
    assert shipped.resolve() == (REPO / 'configs').resolve()


# ---------------------------------------------------------------- resume

def test_resume_gives_the_same_next_losses(full_run, tmp_path):
    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path),
                              '--resume', str(full_run.work_dir / 'iter_4.pth')])
    resumed = train_losses(runner)
    # the first 4 come from the checkpoint's message hub, the last 4 were computed again
    assert len(resumed) == MAX_ITERS
    np.testing.assert_allclose(resumed, full_run.losses, rtol=1e-6, atol=0)
    final_full = read_checkpoint(full_run.work_dir / 'iter_8.pth')['state_dict']
    final_resumed = read_checkpoint(tmp_path / 'iter_8.pth')['state_dict']
    for name, value in final_full.items():
        torch.testing.assert_close(final_resumed[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_auto_picks_the_latest_checkpoint(full_run, tmp_path):
    shutil.copy(full_run.work_dir / 'iter_4.pth', tmp_path / 'iter_4.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_4.pth'))
    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path), '--resume'])
    np.testing.assert_allclose(train_losses(runner), full_run.losses, rtol=1e-6, atol=0)


def test_without_iteration_seed_hook_resume_differs(full_run, tmp_path):
    """The toy model's dropout makes the losses depend on the generators: without the hook
    the resumed run draws other masks (so the exact match above is the hook's doing)."""
    args = train_tool.parse_args([TOY_CONFIG, '--work-dir', str(tmp_path),
                                  '--resume', str(full_run.work_dir / 'iter_4.pth')])
    cfg = train_tool.build_train_config(args)
    cfg.custom_hooks = [h for h in cfg.custom_hooks if h['type'] != 'IterationSeedHook']
    with checkpoint_loading():
        runner = train_tool.build_runner(cfg)
        runner.train()
    resumed = train_losses(runner)
    np.testing.assert_array_equal(resumed[:4], full_run.losses[:4])
    assert np.abs(resumed[4:] - full_run.losses[4:]).max() > 1e-3


def test_resume_from_missing_checkpoint_names_it(tmp_path):
    missing = tmp_path / 'iter_99.pth'
    with pytest.raises(FileNotFoundError, match='iter_99.pth'):
        train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path), '--resume', str(missing)])


# ---------------------------------------------------------------- killed while saving

_DIES_WHILE_SAVING = '''
import os, sys, time
from vlp_codebook.engine import checkpoint_saving

real_atomic_write, real_write_all = checkpoint_saving.atomic_write, checkpoint_saving._write_all
saving = []

def atomic_write(path, data, *args, **kwargs):
    saving[:] = [os.path.basename(os.fspath(path))]
    return real_atomic_write(path, data, *args, **kwargs)

def write_all(handle, data):
    if saving == [sys.argv[1]]:          # half of the checkpoint is in the temporary file: stop here
        handle.write(data[: len(data) // 2])
        handle.flush()
        open(sys.argv[2], 'w').close()
        time.sleep(600)
    real_write_all(handle, data)

checkpoint_saving.atomic_write, checkpoint_saving._write_all = atomic_write, write_all
from vlp_codebook.tools.train import main
main(sys.argv[3:])
'''


def test_sigkill_during_a_save_then_resume_equals_the_uninterrupted_run(full_run, tmp_path):
    from vlp_codebook.engine.resume import checkpoint_damage
    work_dir, flag = tmp_path / 'work', tmp_path / 'saving_iter_8'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FIXTURES), str(REPO)]), OMP_NUM_THREADS='1')
    process = subprocess.Popen([sys.executable, '-c', _DIES_WHILE_SAVING, 'iter_8.pth', str(flag),
                                TOY_CONFIG, '--work-dir', str(work_dir)], env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists(), f'the child never reached the save of iter_8:\n{process.communicate()[0][-3000:]}'
    finally:
        os.killpg(process.pid, signal.SIGKILL)   # a real kill, mid-write
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    temporary = list(work_dir.glob('.iter_8.pth.*.tmp'))
    assert len(temporary) == 1 and temporary[0].stat().st_size > 0   # it died inside the write
    assert not (work_dir / 'iter_8.pth').exists()
    assert checkpoint_damage(str(work_dir / 'iter_4.pth')) is None
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'iter_4.pth')

    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(work_dir), '--resume'])
    np.testing.assert_allclose(train_losses(runner), full_run.losses, rtol=1e-6, atol=0)
    final_full = read_checkpoint(full_run.work_dir / 'iter_8.pth')['state_dict']
    final_resumed = read_checkpoint(work_dir / 'iter_8.pth')['state_dict']
    for name, value in final_full.items():
        torch.testing.assert_close(final_resumed[name], value, rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------- test tool

def test_test_tool_evaluates_the_checkpoint(full_run, tmp_path):
    from toy_modules import ToyRegressionDataset

    checkpoint = full_run.work_dir / 'iter_8.pth'
    metrics = test_tool.main([TOY_CONFIG, str(checkpoint), '--work-dir', str(tmp_path)])
    # the same number by hand: the checkpoint's student weights on the test split (seed 1)
    state = read_checkpoint(checkpoint)['state_dict']
    data = ToyRegressionDataset(num_samples=16, seed=1)
    hidden = torch.relu(data.inputs @ state['student.0.weight'].T + state['student.0.bias'])
    prediction = (hidden @ state['student.3.weight'].T + state['student.3.bias']).squeeze(-1)
    expected = float(((prediction - data.targets) ** 2).mean())
    assert metrics['mse'] == pytest.approx(expected, rel=1e-5)


def test_test_tool_errors(tmp_path, full_run):
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        test_tool.main([TOY_CONFIG, str(tmp_path / 'missing.pth')])
    no_test = tmp_path / 'no_test.py'
    no_test.write_text(f"_base_ = [{TOY_CONFIG!r}]\ntest_dataloader = None\ntest_evaluator = None\n")
    with pytest.raises(ValueError, match='test_dataloader, test_evaluator'):
        test_tool.main([str(no_test), str(full_run.work_dir / 'iter_4.pth')])


# ---------------------------------------------------------------- hooks on their own

def _fake_runner(model):
    return SimpleNamespace(model=model, message_hub=MessageHub(name=f'hooks_{id(model)}'),
                           epoch=2, iter=5, max_iters=10)


def test_hooks_skip_models_without_the_methods():
    runner = _fake_runner(torch.nn.Linear(2, 2))
    ModelScalarsLoggerHook().after_train_iter(runner, 0)
    assert runner.message_hub.log_scalars == {}


@pytest.mark.parametrize('scalars, error, pattern', [
    ([1.0], TypeError, 'must return a dict'),
    ({'t': 'warm'}, TypeError, r"\['t'\] must be a number"),
    ({'t': torch.ones(2)}, TypeError, r'shape \(2,\)'),
    ({'t': float('nan')}, ValueError, r"\['t'\] is nan"),
    ({3: 1.0}, TypeError, 'keys must be str'),
])
def test_scalars_hook_rejects_bad_values(scalars, error, pattern):
    model = torch.nn.Linear(2, 2)
    model.extra_log_scalars = lambda: scalars
    with pytest.raises(error, match=pattern):
        ModelScalarsLoggerHook().after_train_iter(_fake_runner(model), 0)


def test_scalars_hook_accepts_tensors_and_ints():
    model = torch.nn.Linear(2, 2)
    model.extra_log_scalars = lambda: {'temp': torch.tensor(0.07), 'usage': 3}
    runner = _fake_runner(model)
    ModelScalarsLoggerHook().after_train_iter(runner, 0)
    assert runner.message_hub.get_scalar('train/temp').current() == pytest.approx(0.07)
    assert runner.message_hub.get_scalar('train/usage').current() == 3.0


# ---------------------------------------------------------------- amp, launcher

def test_amp_on_cpu_uses_bf16_autocast(tmp_path):
    args = train_tool.parse_args([TOY_CONFIG, '--work-dir', str(tmp_path), '--amp'])
    cfg = train_tool.build_train_config(args)
    expected = 'AmpOptimWrapper' if torch.cuda.is_available() else 'BF16AutocastOptimWrapper'
    assert cfg.optim_wrapper.type == expected
    layer = torch.nn.Linear(4, 4)
    wrapper = BF16AutocastOptimWrapper(optimizer=torch.optim.SGD(layer.parameters(), lr=0.1), device_type='cpu')
    with wrapper.optim_context(layer):
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32


def test_amp_refuses_an_unknown_wrapper(tmp_path):
    args = train_tool.parse_args([TOY_CONFIG, '--work-dir', str(tmp_path), '--amp',
                                  '--cfg-options', 'optim_wrapper.type=MyWrapper'])
    with pytest.raises(ValueError, match="optim_wrapper.type='MyWrapper'"):
        train_tool.build_train_config(args)


def test_cpu_model_wrapper_cfg_sets_device_ids_none():
    wrapper = cpu_model_wrapper_cfg(dict(find_unused_parameters=True, device_ids=[0]))
    assert wrapper == dict(type='MMDistributedDataParallel', find_unused_parameters=True,
                           broadcast_buffers=False, device_ids=None)


def test_setup_launcher_none_leaves_the_config_alone():
    cfg = dict(model_wrapper_cfg=None)
    setup_launcher(cfg, 'none')
    assert cfg == dict(model_wrapper_cfg=None, launcher='none')
    with pytest.raises(ValueError, match="launcher='slurm'"):
        setup_launcher(cfg, 'slurm')


def test_pytorch_launcher_without_torchrun_env_says_so(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match='missing: RANK, WORLD_SIZE.*torchrun'):
        init_cpu_process_group()


def run_process_group(command, timeout, **kwargs):
    """Run ``command`` in its own session; on timeout kill the whole group (torchrun's workers too)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, **kwargs)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f'{" ".join(command)} ran over {timeout} s:\n{output[-5000:]}')
    return process.returncode, output


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU (gloo) launcher path')
def test_two_cpu_processes_match_one_process_on_the_joint_batch(tmp_path):
    """torchrun, 2 ranks x batch 2 vs 1 process x batch 4 (no dropout): DefaultSampler deals the
    same shuffled samples, DDP averages the gradients -> the same weights after 4 steps."""
    options = ['--cfg-options', 'model.dropout=0.0', 'train_cfg.max_iters=4', 'train_cfg.val_interval=2']
    one = train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'one'), *options,
                           'train_dataloader.batch_size=4'])
    assert one.train_loop.iter == 4
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FIXTURES), str(REPO)]), OMP_NUM_THREADS='1')
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
               '127.0.0.1', '--master_port', str(_free_port()), '-m', 'vlp_codebook.tools.train', TOY_CONFIG,
               '--launcher', 'pytorch', '--work-dir', str(tmp_path / 'two'), *options,
               'train_dataloader.batch_size=2']
    returncode, output = run_process_group(command, env=env, timeout=180)
    assert returncode == 0, output[-5000:]
    assert 'Distributed training is not used' not in output
    weights_one = read_checkpoint(tmp_path / 'one' / 'iter_4.pth')['state_dict']
    weights_two = read_checkpoint(tmp_path / 'two' / 'iter_4.pth')['state_dict']
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU (gloo) launcher path')
def test_two_nodes_on_loopback_train_as_one_process_on_the_joint_batch(tmp_path):
    """torchrun --nnodes 2 (one process per "node", both on 127.0.0.1, static rendezvous), gloo:
    the same weights after 4 steps as one process on the joint batch (as the 2-process test)."""
    options = ['--cfg-options', 'model.dropout=0.0', 'train_cfg.max_iters=4', 'train_cfg.val_interval=4']
    one = train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'one'), *options, 'train_dataloader.batch_size=4'])
    assert one.train_loop.iter == 4
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FIXTURES), str(REPO)]), OMP_NUM_THREADS='1',
               GLOO_SOCKET_IFNAME='lo')
    port = _free_port()
    nodes = []
    for node_rank in (0, 1):
        command = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc-per-node', '1',
                   '--node-rank', str(node_rank), '--master-addr', '127.0.0.1', '--master-port', str(port),
                   '-m', 'vlp_codebook.tools.train', TOY_CONFIG, '--launcher', 'pytorch',
                   '--work-dir', str(tmp_path / 'two'), *options, 'train_dataloader.batch_size=2']
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True, env=env))
    deadline = time.monotonic() + 90
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pytest.fail('2-node torchrun ran over 90 s')
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.communicate()
    assert [node.returncode for node in nodes] == [0, 0], '\n'.join(o[-3000:] for o in outputs)
    assert 'Distributed training is not used' not in outputs[0]
    weights_one = read_checkpoint(tmp_path / 'one' / 'iter_4.pth')['state_dict']
    weights_two = read_checkpoint(tmp_path / 'two' / 'iter_4.pth')['state_dict']
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_reading_leaves_torchs_safe_globals_as_they_were(full_run):
    from mmengine.logging import HistoryBuffer

    torch.serialization.add_safe_globals([HistoryBuffer])   # the user's own entry
    try:
        before = set(torch.serialization.get_safe_globals())
        with checkpoint_loading():
            read_checkpoint(full_run.work_dir / 'iter_4.pth')
        assert set(torch.serialization.get_safe_globals()) == before
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals([g for g in before if g is not HistoryBuffer])


