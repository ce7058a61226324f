"""`mim run vlp_codebook train|test` from a regular (non-editable) install.

mim looks for ``vlp_codebook/.mim/tools/<command>.py`` in the *installed* package, and the
tools resolve config names in the installed ``vlp_codebook/.mim/configs`` (a symlink to the
repository's ``configs/`` that the wheel build must turn into real files). So this test builds
a wheel from a copy of the working tree with one extra toy config in ``configs/``, installs it
into a fresh directory, and runs both commands by config *name* from outside the repository.
The toy config's name exists nowhere else, so success proves the installed package was used.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures'
TOY_NAME = 'mim_install_test_toy'
MIM = Path(sys.executable).parent / 'mim'


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f'{" ".join(map(str, command))} failed:\n{output[-5000:]}'
    return output


def _copy_working_tree(destination: Path) -> None:
    """Tracked and untracked-but-not-ignored files, symlinks kept as symlinks (as a clone has them)."""
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split('\0')
    for relative in filter(None, listed):
        source = REPO / relative
        if not source.is_symlink() and not source.is_file():
            continue  # deleted in the working tree
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


@pytest.mark.skipif(not MIM.exists(), reason=f'openmim is not installed next to {sys.executable}')
@pytest.mark.skipif(not (REPO / '.git').exists(), reason='needs a git checkout (copies the tracked files)')
def test_mim_run_train_and_test_from_a_regular_install(tmp_path):
    source = tmp_path / 'source'
    _copy_working_tree(source)
    assert (source / 'vlp_codebook' / '.mim' / 'configs').is_symlink()
    (source / 'configs').mkdir(exist_ok=True)
    shutil.copy(FIXTURES / 'toy_config.py', source / 'configs' / f'{TOY_NAME}.py')

    wheels = tmp_path / 'wheels'
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--quiet',
          '-w', str(wheels), str(source)])
    (wheel,) = wheels.glob('vlp_codebook-*.whl')
    site = tmp_path / 'site'
    _run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--quiet', '--target', str(site), str(wheel)])

    installed = site / 'vlp_codebook' / '.mim'
    for tool in ('train', 'test', 'convert_albef', 'gradcam', 'plot', 'make_sample'):
        assert (installed / 'tools' / f'{tool}.py').is_file(), tool
    shipped = installed / 'configs'
    assert shipped.is_dir() and not shipped.is_symlink()

    def config_files(root):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob('*.py'))

    assert config_files(shipped) == config_files(source / 'configs')
    assert f'{TOY_NAME}.py' in config_files(shipped)

    # outside the repository, the installed package first on the path (before the editable one)
    run_dir = tmp_path / 'elsewhere'
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(FIXTURES)]))
    work_dir = run_dir / 'work'
    output = _run([str(MIM), 'run', 'vlp_codebook', 'train', TOY_NAME, '--work-dir', str(work_dir),
                   '--cfg-options', 'train_cfg.max_iters=2'], cwd=run_dir, env=env)
    assert f'Use the script {installed / "tools" / "train.py"}' in output
    assert 'Iter(train) [2/2]' in output
    checkpoint = work_dir / 'iter_2.pth'
    assert checkpoint.is_file()
    assert 'Config:' not in output  # the config dump is in the log file only

    # a build error: our one line naming the config key, exit status 1; our traceback goes to
    # the log file, so the only traceback is mim's own CalledProcessError report
    failed = subprocess.run([str(MIM), 'run', 'vlp_codebook', 'train', TOY_NAME, '--work-dir', str(run_dir / 'bad'),
                             '--cfg-options', 'model.no_such_argument=1'],
                            capture_output=True, text=True, timeout=300, cwd=run_dir, env=env)
    failed_output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "while building config key 'model.no_such_argument'" in failed_output
    assert failed_output.count('Traceback (most recent call last)') <= 1, failed_output[-5000:]
    assert 'in build_from_cfg' not in failed_output  # no frame of our traceback on the console

    output = _run([str(MIM), 'run', 'vlp_codebook', 'test', f'configs/{TOY_NAME}.py', str(checkpoint),
                   '--work-dir', str(work_dir)], cwd=run_dir, env=env)
    assert f'Use the script {installed / "tools" / "test.py"}' in output
    assert 'mse:' in output

    # convert_albef on a minimal ALBEF-layout checkpoint (1 text + 1 fusion layer)
    src, dst = tmp_path / 'albef.pth', tmp_path / 'codis.pth'
    torch.save({'model': _minimal_albef_state()}, src)
    output = _run([str(MIM), 'run', 'vlp_codebook', 'convert_albef', str(src), str(dst)], cwd=run_dir, env=env)
    assert f'Use the script {installed / "tools" / "convert_albef.py"}' in output
    assert 'BERT: 1 text layers + 1 fusion layers' in output
    assert 'fusion_encoder.layer.0.crossattention.self.query.weight' in torch.load(dst)['state_dict']


def _minimal_albef_state():
    from vlp_codebook.models.encoders import BertFusionEncoder, BertTextEncoder, ViTImageEncoder
    vit = ViTImageEncoder(image_size=16, patch_size=8, hidden_size=8, num_layers=1, num_heads=2)
    text = BertTextEncoder(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
    fusion = BertFusionEncoder(hidden_size=8, num_layers=1, num_heads=2, encoder_width=8, intermediate_size=16)
    state = {'visual_encoder.' + k: v for k, v in vit.vit.state_dict().items()}
    state.update({'text_encoder.bert.' + k: v for k, v in text.bert.state_dict().items()})
    state.update({'text_encoder.bert.encoder.' + k.replace('layer.0.', 'layer.1.'): v
                  for k, v in fusion.state_dict().items()})
    return state
