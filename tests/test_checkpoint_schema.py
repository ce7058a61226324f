"""A checkpoint is read against a schema: nothing in a file is run, imported, deleted or blown up.

Each case takes the checkpoint of a real 4-iteration toy run, forges one part of it, and checks
what must (not) happen: a marker file that code in the file would create, victim files that a
forged path would delete, and, for the memory and time bombs, the peak memory and time of a
subprocess that reads the file and then does what the tools do next (check the weights' values,
copy the optimizer state, copy the message hub as mmengine's save does).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / 'fixtures'
TOY_CONFIG = str(FIXTURES / 'toy_config.py')
REPO = Path(__file__).resolve().parent.parent
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

from vlp_codebook.checkpoint_io import UntrustedCheckpointError, read_checkpoint  # noqa: E402
from vlp_codebook.tools import train as train_tool  # noqa: E402


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """The checkpoint of a real 4-iteration toy run (optimizer, message hub, schedulers)."""
    work_dir = tmp_path_factory.mktemp('toy_run')
    train_tool.main([TOY_CONFIG, '--work-dir', str(work_dir), '--cfg-options', 'train_cfg.max_iters=4'])
    return work_dir / 'iter_4.pth'


def _forge(toy, directory, change, name='forged.pth'):
    checkpoint = read_checkpoint(toy)
    change(checkpoint)
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


# ---------------------------------------------------------------- nothing runs

def test_resume_never_executes_the_config_text_in_meta(toy, tmp_path, capsys):
    marker = tmp_path / 'MARK'
    code = f"x = __import__('os').system('touch {marker}')"
    path = _forge(toy, tmp_path, lambda c: c['meta'].__setitem__('config', code))
    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'w'), '--resume', str(path)])
    assert not marker.exists(), 'the config text in meta was executed'
    assert runner.iter == 8
    assert "meta['config'] (config text: never executed)" in capsys.readouterr().out
    # our own checkpoint reads with nothing ignored (mmengine's numpy eta was saved as a float)
    saved = read_checkpoint(tmp_path / 'w' / 'iter_8.pth')
    assert 'ignored' not in capsys.readouterr().out
    assert type(saved['message_hub']['runtime_info']['eta']) is float


def test_plot_tool_builds_nothing_from_the_work_dir(toy, tmp_path, capsys):
    from vlp_codebook.tools import plot as plot_tool
    work = tmp_path / 'w'
    shutil.copytree(toy.parent, work)
    marker = tmp_path / 'MARK'
    # a config planted in the work dir, as data, naming a dotted type
    cfg = {'model': {'type': 'subprocess.run', 'args': f'touch {marker}', 'shell': True}}
    (work / 'toy_config.config.json').write_text(json.dumps(cfg))
    written = plot_tool.main([str(work), '--out', str(tmp_path / 'plots')])
    assert not marker.exists(), 'a type string from the work dir reached a registry'
    assert 'losses.png' in [os.path.basename(p) for p in written]
    assert 'no gallery: pass --config CONFIG' in capsys.readouterr().out


# ---------------------------------------------------------------- nothing is deleted

@pytest.mark.parametrize('trust', [False, True], ids=['schema', 'trusted-load'])
def test_resume_deletes_no_path_or_step_named_in_the_checkpoint(toy, tmp_path, trust):
    victim_dir = tmp_path / 'victim_dir'
    victim_dir.mkdir()
    (victim_dir / 'precious.txt').write_text('keep me')
    victim_file = tmp_path / 'victim.txt'
    victim_file.write_text('keep me')
    work = tmp_path / 'w'
    work.mkdir()
    later = work / 'iter_100.pth'   # the user's checkpoint of a longer run, above the resumed step
    shutil.copy(toy, later)
    leftover, unrelated = work / '.iter_8.pth.k3j2ab.tmp', work / 'notes.tmp'
    leftover.write_bytes(b'half a checkpoint')
    unrelated.write_text('mine')

    def forge(checkpoint):
        hub = checkpoint['message_hub']
        hub['runtime_info'].update(best_ckpt=str(victim_dir), best_score=1e9, keep_ckpt_ids=[100, 4],
                                   last_ckpt=str(victim_file))
        hub['resumed_keys'].update(best_ckpt=True, best_score=True, keep_ckpt_ids=True)

    path = _forge(toy, work, forge, name='iter_4.pth')
    argv = [TOY_CONFIG, '--work-dir', str(work), '--resume', str(path), '--cfg-options',
            'default_hooks.checkpoint.save_best=mse', 'default_hooks.checkpoint.rule=less',
            'default_hooks.checkpoint.max_keep_ckpts=1']
    runner = train_tool.main(argv + (['--trust-checkpoint'] if trust else []))
    assert runner.iter == 8
    assert (victim_dir / 'precious.txt').exists() and victim_file.exists() and later.exists()
    assert (work / 'best_mse_iter_8.pth').exists() and (work / 'iter_8.pth').exists()
    assert not path.exists()   # pruned by max_keep_ckpts=1: found in the work dir's own listing
    assert not leftover.exists() and unrelated.exists()   # a killed save's temporary file is removed


# ---------------------------------------------------------------- nothing blows up

PROBE = r'''
import json, resource, sys, time
import torch
from mmengine.utils import apply_to
from vlp_codebook.checkpoint_io import CheckpointError, read_checkpoint
from vlp_codebook.engine.checkpoint_coverage import nonfinite_keys

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def touch(obj):   # what code after the load may do with any value: read it out
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            touch(item)
    elif hasattr(obj, 'tolist') and not isinstance(obj, torch.Tensor):
        obj.tolist()

torch.zeros(1).isfinite()
before, start = rss(), time.perf_counter()
try:
    checkpoint = read_checkpoint(sys.argv[1], map_location='cpu')
    nonfinite_keys(checkpoint.get('state_dict', {}))                      # test tool, gradcam
    for state in checkpoint.get('optimizer', {}).get('state', {}).values():  # resume: optimizer state copied
        [value.contiguous() for value in state.values() if isinstance(value, torch.Tensor)]
    apply_to(checkpoint.get('message_hub', {}), lambda x: hasattr(x, 'cpu'), lambda x: x.cpu())  # next save
    touch(checkpoint.get('meta', {}))
    outcome = 'loaded'
except CheckpointError as error:
    outcome = str(error)
print(json.dumps(dict(outcome=outcome, rss_mb=rss() - before, seconds=time.perf_counter() - start)))
'''


def _probe(path, env=None):
    result = subprocess.run([sys.executable, '-c', PROBE, str(path)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, **(env or {})), cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(**json.loads(result.stdout.strip().splitlines()[-1]), stdout=result.stdout)


class _SharedHistories:
    """Unpickles as ``HistoryBuffer(shared, shared)``: every buffer references the same list."""

    def __init__(self, shared):
        self.shared = shared

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        return (HistoryBuffer, (self.shared, self.shared, 1_000_000))


def _zero_stride_state(c):
    c['state_dict']['extra'] = torch.zeros(1).expand(100_000_000)        # 400 MB once expanded


def _zero_stride_optimizer(c):
    c['optimizer']['state'][0]['exp_avg'] = torch.zeros(1).expand(100_000_000)


def _shared_histories(c):
    shared = list(range(200_000))
    c['message_hub']['log_scalars'] = {f'train/x{i}': _SharedHistories(shared) for i in range(100)}


def _shared_reference_dag(c):
    node = [0]
    for _ in range(22):   # 22 levels of [x, x]: 4 million lists once copied
        node = [node, node]
    c['message_hub']['runtime_info']['eta'] = node


def _colliding_keys(c):
    c['meta']['dataset_meta'] = {n * (2 ** 61 - 1) + 7: 0 for n in range(1, 20_001)}


BOMBS = {
    # name: (forge, words of the refusal, or None: loads with the entry dropped)
    'zero-stride tensor in state_dict': (_zero_stride_state, "checkpoint['state_dict']['extra'] of shape (100000000,)"),
    'zero-stride tensor in optimizer state': (_zero_stride_optimizer, "['exp_avg'] of shape (100000000,) and strides (0,)"),
    '100 HistoryBuffers sharing one list': (_shared_histories, None),
    'shared-reference list in runtime_info': (_shared_reference_dag, 'that is also reachable by another path'),
    '20k colliding int keys in meta': (_colliding_keys, 'an integer of 62 bits'),
}


@pytest.mark.parametrize('bomb', list(BOMBS))
def test_memory_and_time_bombs_are_bounded(bomb, toy, tmp_path):
    forge, words = BOMBS[bomb]
    path = _forge(toy, tmp_path, forge)
    assert path.stat().st_size < 12_000_000
    result = _probe(path)
    if words is None:
        assert result.outcome == 'loaded' and "['log_scalars']['train/x" in result.stdout
    else:
        assert words in result.outcome and str(path) in result.outcome and '--trust-checkpoint' in result.outcome
    assert result.rss_mb < 60, f'{bomb}: {result.rss_mb:.0f} MB'
    # a ceiling that holds on a loaded 2-core machine; the outcome and the memory above are what
    # tell a bounded read from an expanded one (unbounded, these files took 20-50 s and GBs)
    assert result.seconds < 15.0, f'{bomb}: {result.seconds:.1f} s'


def test_compressed_archive_member_is_refused_unexpanded(tmp_path):
    plain, packed = tmp_path / 'plain.pth', tmp_path / 'packed.pth'
    torch.save({'state_dict': {'w': torch.zeros(50_000_000)}}, plain)   # 200 MB of zeros
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(packed, 'w', zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            with source.open(info) as reader, target.open(info.filename, 'w', force_zip64=True) as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
    plain.unlink()
    assert packed.stat().st_size < 1_000_000
    result = _probe(packed)
    assert "compressed archive member 'plain/data.pkl'" in result.outcome
    assert result.rss_mb < 60 and result.seconds < 3.0


class _ForgedDtype:
    """A structured numpy dtype whose one field claims offset 2**40 in an 8-byte item."""

    def __reduce__(self):
        return (np.dtype, ('V8', False, True), (3, '|', None, ('a',), {'a': (np.dtype('<f8'), 2 ** 40)}, 8, 1, 16))


class _ForgedArray:
    def __reduce__(self):
        from numpy.core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (0,), b'b'), (1, (1,), _ForgedDtype(), False, b'\0' * 8))


def test_forged_numpy_dtype_state_never_reaches_numpy(toy, tmp_path):
    path = _forge(toy, tmp_path, lambda c: c['meta'].__setitem__('dataset_meta', {'palette': _ForgedArray()}))
    result = _probe(path)
    assert result.outcome == 'loaded'
    assert "checkpoint['meta']['dataset_meta']['palette'] (numpy." in result.stdout
    # the same file unpickled by numpy (the opt-in): the forged state is real, numpy crashes on it
    crashed = subprocess.run([sys.executable, '-c', PROBE, str(path)], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, VLP_CODEBOOK_TRUST_CHECKPOINTS='1'), cwd=str(REPO))
    assert crashed.returncode != 0 or 'loaded' not in crashed.stdout


# ---------------------------------------------------------------- older and foreign files

def test_checkpoint_of_the_previous_version_resumes_without_its_pickled_buffers(toy, tmp_path, capsys):
    from mmengine.logging import HistoryBuffer

    def as_before(checkpoint):   # the previous version saved mmengine's own objects
        hub = checkpoint['message_hub']
        for key, plain in hub['log_scalars'].items():
            hub['log_scalars'][key] = HistoryBuffer(plain['log'], plain['count'], plain['max_length'])
        hub['runtime_info']['eta'] = np.float64(1.5)

    path = _forge(toy, tmp_path, as_before)
    runner = train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'w'), '--resume', str(path)])
    assert runner.iter == 8
    out = capsys.readouterr().out
    assert "log_scalars']['train/loss'] (mmengine.logging.history_buffer.HistoryBuffer)" in out
    assert "runtime_info']['eta'] (numpy." in out


def test_dropped_entries_never_leave_a_placeholder(toy, tmp_path):
    path = _forge(toy, tmp_path, lambda c: c['meta'].__setitem__('seed', np.int64(3)))
    meta = read_checkpoint(path)['meta']
    assert 'seed' not in meta and meta['iter'] == 4


def test_a_placeholder_that_is_the_whole_file_is_refused(tmp_path):
    path = tmp_path / 'array.pth'
    torch.save(np.zeros(3), path)
    with pytest.raises(UntrustedCheckpointError, match='numpy and mmengine objects are not read'):
        read_checkpoint(path)


# ---------------------------------------------------------------- the smaller items

@pytest.mark.parametrize('how', ['--resume', 'load_from'])
def test_nan_weights_on_resume_or_load_from_name_the_checkpoint(how, toy, tmp_path):
    def poison(checkpoint):
        next(v for v in checkpoint['state_dict'].values() if v.is_floating_point())[0] = float('nan')

    path = _forge(toy, tmp_path, poison, name='diverged.pth')
    argv = ['--resume', str(path)] if how == '--resume' else ['--cfg-options', f'load_from={path}']
    with pytest.raises(ValueError, match=r'checkpoint .*diverged\.pth: 1 tensor\(s\) hold NaN or inf'):
        train_tool.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'w')] + argv)


def test_plot_tool_names_a_broken_usage_file(toy, tmp_path):
    from vlp_codebook.tools import plot as plot_tool
    work = tmp_path / 'w'
    shutil.copytree(toy.parent, work)
    (work / 'plots').mkdir()
    (work / 'plots' / 'codebook_usage.json').write_text('{"usage": [0.5, ')
    with pytest.raises(ValueError, match=r'plots/codebook_usage\.json: not a JSON object'):
        plot_tool.main([str(work), '--no-gallery', '--out', str(tmp_path / 'out')])


def test_codebook_usage_is_replaced_atomically(tmp_path, monkeypatch):
    from vlp_codebook.engine import checkpoint_saving
    from vlp_codebook.engine.plot_hook import TrainingPlotsHook
    from vlp_codebook.models.codebook import Codebook

    usage_file = tmp_path / 'plots' / 'codebook_usage.json'
    usage_file.parent.mkdir()
    usage_file.write_text('{"usage": [1.0]}')
    runner = SimpleNamespace(iter=3, work_dir=str(tmp_path), model=torch.nn.Sequential(Codebook(8, 4)),
                             visualizer=SimpleNamespace(add_scalars=lambda *args, **kwargs: None))

    def killed(handle, data):
        handle.write(data[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_saving, '_write_all', killed)
    with pytest.raises(KeyboardInterrupt):
        TrainingPlotsHook()._record_codebook(runner, epoch=1)
    assert json.loads(usage_file.read_text()) == {'usage': [1.0]}   # the old file, whole
    assert [p.name for p in usage_file.parent.iterdir()] == ['codebook_usage.json']


CSV_CASES = [
    ('filepath,title\na.png,a cat\n', "no column 'filepath' when read with --csv-separator '\\t'"),
    ('filepath\ttitle\na.png\ta cat\nb.png\t\nc.png\t  \n', "2 empty 'title' entries (lines [3, 4])"),
]


@pytest.mark.parametrize('text, words', CSV_CASES, ids=['wrong-separator', 'empty-caption'])
def test_openclip_csv_problems_are_named_before_training(text, words, tmp_path):
    from vlp_codebook_openclip.train import main
    data = tmp_path / 'train.csv'
    data.write_text(text)
    with pytest.raises(ValueError) as error:
        main(['--model', 'codis-tiny-vit', '--train-data', str(data), '--dataset-type', 'csv',
              '--logs', str(tmp_path / 'logs'), '--workers', '0'])
    assert words in str(error.value) and f'--train-data {data}' in str(error.value)
    assert not (tmp_path / 'logs').exists()


def test_an_archive_with_a_second_pickle_is_refused(tmp_path):
    good, two = tmp_path / 'good.pth', tmp_path / 'two.pth'
    torch.save({'state_dict': {'w': torch.zeros(2)}}, good)
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(two, 'w') as target:
        first, *rest = source.infolist()
        target.writestr(first, source.read(first))
        target.writestr('other/data.pkl', source.read('good/data.pkl'))   # which one would torch read?
        for info in rest:
            target.writestr(info, source.read(info))
    with pytest.raises(UntrustedCheckpointError, match='2 data.pkl members'):
        read_checkpoint(two)


def test_every_dense_dtype_and_plain_value_of_the_schema_reads_back(tmp_path):
    """What our files hold reads back as written: tensors of the 12 dense dtypes, a parameter,
    dtypes, a device, a size, bytes."""
    from vlp_codebook.checkpoint_io import SCHEMA_GLOBALS
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.complex128, torch.complex64]
    state = {str(d): torch.ones(3, dtype=d) for d in dtypes}
    state.update(param=torch.nn.Parameter(torch.arange(4.0)), dtype=torch.bfloat16, device=torch.device('cpu'),
                 size=torch.Size([2, 3]), raw=b'\x00\xff')
    path = tmp_path / 'all.pth'
    torch.save({'state_dict': state}, path)
    loaded = read_checkpoint(path)['state_dict']
    for d in dtypes:
        assert loaded[str(d)].dtype == d and torch.equal(loaded[str(d)], state[str(d)])
    assert torch.equal(loaded['param'], state['param'])
    assert (loaded['dtype'], loaded['device'], loaded['size'], loaded['raw']) == \
        (torch.bfloat16, torch.device('cpu'), torch.Size([2, 3]), b'\x00\xff')
    assert len(SCHEMA_GLOBALS) == 30


@pytest.mark.parametrize('value, name', [
    (torch.zeros(4).to_sparse(), 'torch._utils._rebuild_sparse_tensor'),
    ({1, 2}, 'builtins.set'),
    (torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8), 'torch._utils._rebuild_qtensor'),
    (torch.zeros(2, dtype=torch.float8_e4m3fn), 'torch._utils._rebuild_tensor_v3'),
])
def test_what_torch_accepts_but_our_files_never_hold_is_refused_by_name(value, name, tmp_path):
    """torch's weights_only=True would build these; a checkpoint of this project never holds them,
    so the schema refuses them before anything is built, naming the global."""
    path = tmp_path / 'foreign.pth'
    torch.save({'state_dict': {'x': value}}, path)
    with pytest.raises(UntrustedCheckpointError) as error:
        read_checkpoint(path)
    assert name in str(error.value) and 'no checkpoint of this project holds' in str(error.value)


def test_torch_load_as_data_routes_another_librarys_load_and_restores_it(tmp_path):
    """Inside the block a library's own ``torch.load`` call reads against the schema (a set, which
    torch's weights_only accepts, is refused, named with the label and the path); the real
    ``torch.load`` is back after the block, also when the load raised."""
    from vlp_codebook.checkpoint_io import torch_load_as_data
    real_load = torch.load
    path = tmp_path / 'foreign.pth'
    torch.save({'x': {1, 2}}, path)
    with pytest.raises(UntrustedCheckpointError) as error, torch_load_as_data(label='https://host/w.pth'):
        torch.load(str(path), map_location='cpu', weights_only=True, mmap=False)
    assert 'builtins.set' in str(error.value) and f'https://host/w.pth ({path})' in str(error.value)
    assert torch.load is real_load
    assert torch.load(path, weights_only=True)['x'] == {1, 2}      # torch's own loader again
    good = tmp_path / 'good.pth'
    torch.save({'w': torch.arange(3.0)}, good)
    with torch_load_as_data():
        assert torch.equal(torch.load(good)['w'], torch.arange(3.0))
    assert torch.load is real_load
