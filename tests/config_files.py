"""Loads an experiment file `configs/NAME.py` as a module, as the `--config=configs/NAME.py` flag does."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config_module(name: str):
    """The module of configs/NAME.py (its `get_config` and docstring)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
