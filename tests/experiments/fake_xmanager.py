"""A stand-in for the slice of xmanager that experiments/xm_launch.py calls, so its launches run without the
optional `xm` extra.

It has the same names and keyword arguments (`xm.binary`, `xm.Job`, `xm.ShellSafeArg`,
`xm_local.create_experiment`, `xm_local.Local`, `Local.Spec`) and behaves like xmanager's local executor:
each work unit starts as a process when it is added, with exactly the binary's `env_vars` as its
environment (not the caller's), in a directory that is not the repository, and leaving the experiment's
context waits for all of them. Every experiment and job is recorded for the test to inspect.
"""

from __future__ import annotations

import dataclasses
import subprocess
import tempfile
import types


@dataclasses.dataclass(frozen=True)
class ShellSafeArg:
    arg: str


@dataclasses.dataclass(frozen=True)
class Binary:
    path: str
    env_vars: dict
    executor_spec: object


@dataclasses.dataclass(frozen=True)
class Job:
    executable: Binary
    executor: object
    args: list


class Local:
    class Spec:
        pass


def binary(*, path: str, env_vars: dict, executor_spec) -> Binary:
    assert isinstance(executor_spec, Local.Spec), executor_spec
    return Binary(path=path, env_vars=dict(env_vars), executor_spec=executor_spec)


class FakeXManager:
    """`modules()` returns (xm, xm_local), as `xm_launch._import_xmanager` does."""

    def __init__(self):
        self.experiments: list[Experiment] = []

    def modules(self):
        xm = types.SimpleNamespace(binary=binary, Job=Job, ShellSafeArg=ShellSafeArg)
        xm_local = types.SimpleNamespace(Local=Local, create_experiment=self.create_experiment)
        return xm, xm_local

    def create_experiment(self, *, experiment_title: str) -> Experiment:
        self.experiments.append(Experiment(experiment_title, experiment_id=len(self.experiments) + 1))
        return self.experiments[-1]


class Experiment:
    def __init__(self, title: str, experiment_id: int):
        self.title, self.experiment_id = title, experiment_id
        self.jobs: list[dict] = []  # {"argv": [...], "env": {...}, "returncode": int}
        self._processes: list[subprocess.Popen] = []
        self._cwd = tempfile.TemporaryDirectory()

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc) -> None:
        for job, process in zip(self.jobs, self._processes):
            job["returncode"] = process.wait(timeout=600)
        self._cwd.cleanup()

    def package(self, packageables: list) -> list:
        assert all(isinstance(p, Binary) for p in packageables), packageables
        return list(packageables)

    def add(self, job: Job) -> None:
        assert isinstance(job.executor, Local) and all(isinstance(a, ShellSafeArg) for a in job.args), job
        argv = [job.executable.path] + [a.arg for a in job.args]
        self.jobs.append({"argv": argv, "env": job.executable.env_vars})
        self._processes.append(
            subprocess.Popen(
                argv,
                env=job.executable.env_vars,
                cwd=self._cwd.name,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
