"""Runs a list of RunSpecs as one xmanager experiment on the local executor, one work unit per run.

xmanager is an optional extra (`pip install -e .[xm]`; ~575 MB, and it pins an older protobuf), so
nothing in polaris_jax imports it; only this file does, and only when `--launcher=xm` is asked for.

Each work unit runs `python experiments/launch.py --config=... --workdir=... --set=...`, the local
launcher, so its logs and result.json land in the run's workdir exactly as for a local run, and the
sweep summary reads them the same way. The local executor starts every work unit at once and the
experiment's context manager waits for all of them to finish.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence

from experiments.runspec import REPO_ROOT, RunSpec, format_value

LAUNCH_SCRIPT = os.path.join(REPO_ROOT, "experiments", "launch.py")


def work_unit_argv(run: RunSpec) -> list[str]:
    """Arguments (after the interpreter) of the work unit that runs `run` through the local launcher."""
    argv = [LAUNCH_SCRIPT, f"--config={run.config}", f"--workdir={os.path.abspath(run.workdir)}"]
    return argv + [f"--set={key}={format_value(value)}" for key, value in run.overrides]


def work_unit_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of every work unit: the local executor replaces the environment with env_vars, so
    the current one is handed over (xmanager accepts only plain variable names), with the repository on
    PYTHONPATH."""
    env = {k: v for k, v in environ.items() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH", "")]))
    return env


def _import_xmanager():
    """(xm, xm_local): the only place xmanager is imported, and the seam the tests fake."""
    try:
        from xmanager import xm, xm_local
    except ImportError as e:
        raise SystemExit("--launcher=xm needs xmanager: pip install -e '.[xm]' (the optional `xm` extra)") from e
    from absl import flags

    if not flags.FLAGS.is_parsed():  # xmanager reads its own absl flags (database, ...); use their defaults
        flags.FLAGS([sys.argv[0]])
    return xm, xm_local


def launch(runs: Sequence[RunSpec], *, title: str, python: str = sys.executable) -> int:
    """Creates the experiment, adds one work unit per run, waits for all; returns the experiment id."""
    xm, xm_local = _import_xmanager()
    env = work_unit_env()
    with xm_local.create_experiment(experiment_title=title) as experiment:
        [executable] = experiment.package([xm.binary(executor_spec=xm_local.Local.Spec(), path=python, env_vars=env)])
        for run in runs:
            os.makedirs(run.workdir, exist_ok=True)
            # ShellSafeArg: the binary is exec'd without a shell, so xmanager's shell quoting must not apply.
            args = [xm.ShellSafeArg(a) for a in work_unit_argv(run)]
            experiment.add(xm.Job(executable=executable, executor=xm_local.Local(), args=args))
        experiment_id = experiment.experiment_id
    return experiment_id
