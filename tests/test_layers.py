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


def test_every_top_level_module_has_a_layer():
    # A module missing from the layers contract is unconstrained: it could import upward unnoticed.
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["id"] == "layers")["layers"]
    named = {name.strip().strip("()") for layer in layers for name in layer.split("|")}
    package = ROOT / "polaris_jax"
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    assert not modules - named, f"add these to the layers contract in pyproject.toml: {sorted(modules - named)}"
