"""Packaging hygiene: the licence file matches pyproject, test-only packages stay out of the core."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / 'pyproject.toml').read_text()


def _imported_top_level_modules(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split('.')[0]


def test_license_file_is_the_declared_apache_2():
    assert re.search(r'^license = "Apache-2.0"$', PYPROJECT, re.M)
    text = (ROOT / 'LICENSE').read_text()
    assert 'Apache License' in text and 'Version 2.0, January 2004' in text
    assert 'END OF TERMS AND CONDITIONS' in text


def test_pot_is_a_test_dependency_and_the_core_never_imports_it():
    runtime = PYPROJECT.split('dependencies = [', 1)[1].split(']', 1)[0]
    test_extra = re.search(r'^test = \[(.*)\]$', PYPROJECT, re.M).group(1)
    assert '"pot' not in runtime and '"pot' in test_extra
    offenders = [str(path.relative_to(ROOT)) for path in sorted((ROOT / 'vlp_codebook').rglob('*.py'))
                 if 'ot' in set(_imported_top_level_modules(path))]
    assert not offenders, f'the core imports POT (`ot`), a test-only package: {offenders}'


def test_ruff_is_configured_and_in_the_test_extra():
    assert '[tool.ruff.lint]' in PYPROJECT
    assert '"ruff' in re.search(r'^test = \[(.*)\]$', PYPROJECT, re.M).group(1)
    assert 'ruff check' in (ROOT / '.ci' / 'run').read_text()
