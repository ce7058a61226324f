"""The commands in README.md and docs/*.md refer to things that exist, so they work as written.

Extracted from the text (fenced blocks and inline code), not listed by hand, so that a renamed
config, a checkpoint the config never writes (the README once named ``epoch_4.pth`` of a demo
that saves ``epoch_5``/``epoch_10``), a bare ``mim`` that set-up does not put on PATH, a tool
that does not exist, or a docs page missing from the README's table fails here.
"""
import os.path as osp
import re
import shlex
from pathlib import Path

import pytest
from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = sorted((ROOT / 'docs').glob('*.md'))
PAGES = [README, *DOCS]
#: what `bash scripts/setup_env.sh main|test` puts into .venv/bin and the README calls
VENV_EXECUTABLES = ('python', 'mim', 'torchrun', 'pip')

_FENCE = re.compile(r'```(?:bash|sh|shell)\n(.*?)```', re.S)
_INLINE = re.compile(r'`([^`\n]+)`')


def _commands(page: Path, inline: bool = True):
    """Shell commands of a page: fenced bash lines (continuations joined) and inline code that
    reads as a command (an executable and at least two arguments)."""
    text = page.read_text()
    commands = []
    for block in _FENCE.findall(text):
        joined = re.sub(r'\\\n\s*', ' ', block)
        for line in joined.splitlines():
            line = line.split(' # ')[0].split('  #')[0].strip()
            if line and not line.startswith('#'):
                commands.extend(part.strip() for part in line.split('&&'))
    for code in _INLINE.findall(_FENCE.sub('', text)) if inline else ():
        if re.match(r'(\.venv/bin/)?(python|mim|torchrun|bash)\b', code) and len(code.split()) >= 3:
            commands.append(code)
    return commands


def _words(command):
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def _all_commands():
    return [(page, command) for page in PAGES for command in _commands(page)]


def _page_id(item):
    page, command = item
    return f'{page.name}: {command[:60]}'


COMMANDS = _all_commands()


def test_commands_were_found():
    readme = [c for p, c in COMMANDS if p == README]
    assert 'bash scripts/setup_env.sh main' in readme
    assert '.venv/bin/mim run vlp_codebook train configs/codis_demo.py' in readme
    assert any('mim run vlp_codebook test' in c for c in readme)


@pytest.mark.parametrize('item', [i for i in COMMANDS if i[0] == README], ids=_page_id)
def test_readme_calls_the_venv_executables(item):
    """After set-up only ``.venv/bin/...`` is there: no bare ``mim`` anywhere in the README, and
    the copy-paste blocks call ``.venv/bin/python`` / ``torchrun`` too (prose may say ``python -m``)."""
    _, command = item
    first = _words(command)[0]
    in_block = command in _commands(README, inline=False)
    if first == 'mim' or (in_block and first in VENV_EXECUTABLES):
        pytest.fail(f'README command {command!r}: use .venv/bin/{first} (what scripts/setup_env.sh installs)')
    if first.startswith('.venv/bin/'):
        assert Path(first).name in VENV_EXECUTABLES, command


@pytest.mark.parametrize('item', COMMANDS, ids=_page_id)
def test_tools_modules_configs_and_scripts_exist(item):
    page, command = item
    words = _words(command)
    for index, word in enumerate(words):
        if word == 'run' and index + 2 < len(words) and words[index + 1] == 'vlp_codebook':
            tool = words[index + 2]
            if tool.isupper():
                continue  # a placeholder (CMD)
            assert (ROOT / 'vlp_codebook' / '.mim' / 'tools' / f'{tool}.py').is_file(), \
                f'{page.name}: `mim run vlp_codebook {tool}`: no vlp_codebook/.mim/tools/{tool}.py'
        if word == '-m' and index + 1 < len(words) and words[index + 1].startswith('vlp_codebook'):
            module = words[index + 1]
            base = ROOT / 'plugins' if module.startswith(('vlp_codebook_lavis', 'vlp_codebook_openclip')) else ROOT
            path = base / module.replace('.', '/')
            assert path.with_suffix('.py').is_file() or (path / '__init__.py').is_file(), \
                f'{page.name}: `-m {module}`: no such module'
        if re.fullmatch(r'(configs|scripts|plugins|benchmarks)/[\w/.-]+\.(py|sh)', word):
            assert (ROOT / word).is_file(), f'{page.name}: {command!r} names {word}, which does not exist'


def _saved_epochs(config_path: Path):
    """Epoch checkpoints a by-epoch config writes and keeps (CheckpointHook interval, max_keep_ckpts)."""
    cfg = Config.fromfile(str(config_path))
    hook = cfg.default_hooks.checkpoint
    max_epochs = cfg.train_cfg.max_epochs
    interval = hook.get('interval', 1)
    saved = [epoch for epoch in range(1, max_epochs + 1) if epoch % interval == 0 or epoch == max_epochs]
    keep = hook.get('max_keep_ckpts', -1)
    return saved[-keep:] if keep and keep > 0 else saved


_CHECKPOINT = re.compile(r'work_dirs/(?P<config>[\w-]+)/epoch_(?P<epoch>\d+)\.pth')


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_named_epoch_checkpoints_are_written_by_their_config(page):
    """``work_dirs/<config>/epoch_N.pth``: ``configs/<config>.py`` exists and saves (and keeps) epoch N."""
    for match in _CHECKPOINT.finditer(page.read_text()):
        config = ROOT / 'configs' / f'{match.group("config")}.py'
        if not config.is_file():
            continue  # a work dir named by --work-dir, not after a config
        epoch = int(match.group('epoch'))
        saved = _saved_epochs(config)
        assert epoch in saved, (f'{page.name} names {match.group(0)}, but {config.name} saves epochs {saved}')


def test_demo_checkpoints_named_in_the_readme():
    assert _saved_epochs(ROOT / 'configs' / 'codis_demo.py') == [5, 10]
    text = README.read_text()
    assert 'epoch_5.pth' in text and 'work_dirs/codis_demo/epoch_10.pth' in text


def test_every_docs_page_is_in_the_readme_table():
    table = README.read_text().split('## Documentation', 1)[1]
    missing = [doc.name for doc in DOCS if f'(docs/{doc.name})' not in table]
    assert not missing, f'docs pages missing from the README table: {missing}'


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', page.read_text()):
        if '://' in target or target.startswith('mailto:'):
            continue
        assert (page.parent / target).exists(), f'{page.name}: link to {target}, which does not exist'


def test_setup_flavours_named_in_the_readme_exist():
    script = (ROOT / 'scripts' / 'setup_env.sh').read_text()
    for flavour in re.findall(r'setup_env\.sh (\w+)', README.read_text()):
        assert re.search(rf'^\s*{flavour}\)', script, re.M), f'setup_env.sh has no flavour {flavour!r}'


def test_no_page_cites_a_file_outside_the_repository():
    """``SPEC.md`` (the project brief) is not shipped: pages must not send readers to it."""
    for page in PAGES:
        assert 'SPEC.md' not in page.read_text() or osp.exists(ROOT / 'SPEC.md'), page.name


def test_the_tests_import_the_checkout():
    """scripts/setup_env.sh installs the package the regular way (for `mim run`); the tests must
    still run against the working tree (pyproject.toml's pytest `pythonpath`)."""
    from importlib.util import find_spec
    for package, where in (('vlp_codebook', ROOT), ('vlp_codebook_lavis', ROOT / 'plugins')):
        assert Path(find_spec(package).origin).resolve().is_relative_to(where.resolve()), package
