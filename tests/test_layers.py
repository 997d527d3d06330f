"""The import contracts in pyproject.toml (`lint-imports`) hold, so `make test` also catches a layer break."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINT_IMPORTS = pathlib.Path(sys.executable).parent / "lint-imports"


def test_every_package_directory_has_an_init():
    # import-linter skips a folder without __init__.py (a namespace package) and everything below
    # it, so a room without one would go unchecked.
    missing = sorted(
        str(folder.relative_to(ROOT))
        for folder in [ROOT / "polaris_jax", *(ROOT / "polaris_jax").rglob("*")]
        if folder.is_dir() and any(folder.glob("*.py")) and not (folder / "__init__.py").exists()
    )
    assert not missing, f"add an __init__.py to: {missing}"


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")
def test_import_contracts_hold():
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
