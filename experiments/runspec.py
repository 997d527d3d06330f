"""What a launcher needs to know about one run: its `RunSpec`, its exact command line, where its record lands.

Shared by the local launcher (`launch.py`), the xmanager launcher (`xm_launch.py`) and sweeps (`sweep.py`);
it imports none of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_FILE = "result.json"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: a config file (with optional `:arg`), its workdir and `--config.key=value` overrides."""

    config: str
    workdir: str
    overrides: tuple[tuple[str, object], ...] = ()
    name: str = ""

    def __post_init__(self):
        path = self.config.split(":", 1)[0]
        if not path.endswith(".py"):
            raise ValueError(f"config {self.config!r} is not a configs/*.py file (optionally with :arg)")
        if not self.workdir:
            raise ValueError("workdir is empty")
        for key, _ in self.overrides:
            if not key or key.startswith("-") or " " in key:
                raise ValueError(f"override key {key!r} must be a dotted config path like train.steps")


def format_value(value) -> str:
    """How a Python value is written on the command line for ml_collections' config flags."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (tuple, list)):  # a Python literal: config_flags parses tuples with literal_eval
        return repr(tuple(value))
    return str(value)


def parse_override(text: str) -> tuple[str, str]:
    """'train.steps=50' -> ('train.steps', '50'); the value stays a string, parsed by config_flags."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not KEY=VALUE")
    return key.strip(), value


def command(run: RunSpec, python: str = sys.executable) -> list[str]:
    """The exact argv of a run (run from the repository root)."""
    argv = [python, "-m", "polaris_jax.main", f"--config={run.config}", f"--workdir={os.path.abspath(run.workdir)}"]
    argv += [f"--config.{key}={format_value(value)}" for key, value in run.overrides]
    return argv


def shell_line(argv: Sequence[str]) -> str:
    return f"cd {shlex.quote(REPO_ROOT)} && {shlex.join(argv)}"


def read_result(workdir: str) -> dict | None:
    """The record a finished run left in WORKDIR/result.json (None if it has not finished)."""
    path = os.path.join(workdir, RESULT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
