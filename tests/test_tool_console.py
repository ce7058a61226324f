"""What the train tool prints (vlp_codebook.tools.cli, vlp_codebook.tools.tool_runner).

The console gets one line with the device and the log file, compact training lines and the
metrics; the environment, config dump and hook table go to the log file (``--verbose`` prints
them). A build error is one line naming the config key, exit status 1, no traceback (that goes
to the log file).
"""
import glob
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from vlp_codebook.tools.cli import apply_cpu_threads, cpu_threads_from, format_error, prepare_process
from vlp_codebook.tools.tool_runner import compact_train_line, locate_config_key

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FIXTURES = osp.join(ROOT, 'tests', 'fixtures')
TOY = osp.join(FIXTURES, 'toy_config.py')


def _train(tmp_path, *extra):
    work_dir = tmp_path / 'work'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([FIXTURES, ROOT]))
    result = subprocess.run([sys.executable, '-m', 'vlp_codebook.tools.train', TOY, '--work-dir', str(work_dir),
                             '--cfg-options', 'train_cfg.max_iters=2', *extra],
                            capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    logs = glob.glob(str(work_dir / '*' / '*.log'))
    log_text = open(logs[0]).read() if logs else ''
    return result, log_text


def test_console_is_short_and_the_log_file_complete(tmp_path):
    result, log_text = _train(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    for file_only in ('Config:', 'System environment:', 'Hooks will be executed', 'FileClient'):
        assert file_only not in console, file_only
    assert 'Config:' in log_text and 'System environment:' in log_text
    assert 'FileClient' not in log_text  # mmengine's own deprecation notice is dropped
    if not torch.cuda.is_available():
        assert 'device CPU (' in console
        assert 'device: CPU (' in log_text and 'GPU number' not in log_text
    # compact training line on the console, every term in the file
    train_lines = [line for line in console.splitlines() if 'Iter(train) [2/2]' in line]
    assert train_lines and all('lr:' not in line and 'loss:' in line for line in train_lines)
    assert any('Iter(train) [2/2]' in line and 'lr:' in line for line in log_text.splitlines())
    assert len(console.splitlines()) < 40


def test_verbose_prints_the_dump(tmp_path):
    result, _ = _train(tmp_path, '--verbose')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Config:' in result.stdout and 'Hooks will be executed' in result.stdout


def test_build_error_is_one_line_naming_the_key(tmp_path):
    result, log_text = _train(tmp_path, 'model.no_such_argument=1')
    assert result.returncode == 1
    console = result.stdout + result.stderr
    assert 'Traceback' not in console
    assert console.count('no_such_argument') == 2  # the error line and the config key line
    assert "while building config key 'model.no_such_argument'" in result.stderr
    assert 'TypeError' in result.stderr
    assert 'Traceback' in log_text  # kept for debugging


def test_locate_config_key_narrows_to_the_argument_or_type():
    cfg = Config(dict(model=dict(type='CODIS', image_encoder=dict(type='ViTImageEncoder', foo=1),
                                 text_encoder=dict(type='BertTextEncoder'))))
    unexpected = TypeError("ViTImageEncoder.__init__() got an unexpected keyword argument 'foo'")
    assert locate_config_key(cfg, ['model'], unexpected) == 'model.image_encoder.foo'
    unknown = KeyError("type='BertTextEncoder' is not registered in the 'vlp_codebook::model' registry.")
    assert locate_config_key(cfg, ['model'], unknown) == 'model.text_encoder.type'
    assert locate_config_key(cfg, ['model'], ValueError('something else')) == 'model'


def test_format_error_names_the_key_and_unquotes_key_errors():
    error = KeyError('unknown thing')
    error.config_key = 'model.x.type'
    text = format_error('prog', error)
    assert text.splitlines()[0] == 'prog: error: KeyError: unknown thing'
    assert "'model.x.type'" in text


def test_compact_train_line_keeps_progress_and_total_loss():
    line = ('Epoch(train) [1][ 25/125]  lr: 2.7e-04  eta: 0:05:13  time: 3.4663  data_time: 0.0213  '
            'loss: 38.8959  loss_t2i: 6.1475')
    assert compact_train_line(line) == 'Epoch(train) [1][ 25/125]  eta: 0:05:13  time: 3.4663  loss: 38.8959'
    assert compact_train_line('Saving checkpoint at 5 epochs') == 'Saving checkpoint at 5 epochs'


@pytest.mark.skipif(torch.cuda.is_available(), reason='cpu_threads applies without CUDA only')
def test_cpu_threads_from_the_config():
    before = torch.get_num_threads()
    try:
        assert apply_cpu_threads(Config(dict(env_cfg=dict(cpu_threads=1)))) == 1
        assert torch.get_num_threads() == 1
        assert apply_cpu_threads(Config(dict(env_cfg=dict()))) is None
        with pytest.raises(ValueError, match='env_cfg.cpu_threads'):
            apply_cpu_threads(Config(dict(env_cfg=dict(cpu_threads=0))))
        torch.set_num_threads(2)
        with cpu_threads_from(Config(dict(env_cfg=dict(cpu_threads=1)))) as threads:
            assert threads == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # restored for the rest of the process
    finally:
        torch.set_num_threads(before)


def test_prepare_process_sets_a_passive_wait_policy_unless_given():
    environ = {}
    prepare_process(environ)
    assert environ['OMP_WAIT_POLICY'] == 'PASSIVE'
    environ = {'OMP_WAIT_POLICY': 'ACTIVE'}
    prepare_process(environ)
    assert environ['OMP_WAIT_POLICY'] == 'ACTIVE'
