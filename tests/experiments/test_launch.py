"""experiments/launch.py: exact command lines in dry-run, result parsing, failure records; experiments/xm_launch.py
through a faked xmanager (tests/experiments/fake_xmanager.py), and through the real one when the `xm` extra is
installed."""

import importlib.util
import json
import pathlib
import shlex
import subprocess
import sys

import pytest

from experiments import launch, runspec, xm_launch
from experiments import sweep as sweep_lib
from tests.experiments.fake_xmanager import FakeXManager

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_dry_run_prints_the_exact_command(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/launch.py",
            "--config=configs/sft_tiny.py:lora",
            f"--workdir={tmp_path}/run",
            "--set=train.steps=5",
            "--set=data.sources=('a b.jsonl',)",
            "--dry_run",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    cd, _, cmd = line.partition(" && ")
    assert cd == f"cd {REPO_ROOT}"
    assert shlex.split(cmd) == [
        sys.executable,
        "-m",
        "polaris_jax.main",
        "--config=configs/sft_tiny.py:lora",
        f"--workdir={tmp_path}/run",
        "--config.train.steps=5",
        "--config.data.sources=('a b.jsonl',)",
    ]
    assert not (tmp_path / "run").exists()


def test_printed_command_is_what_main_accepts(tmp_path):
    """The dry-run line, run through a shell, reaches polaris_jax.main's config parsing: a bad key is
    refused by name (so the quoting and flag spelling survived the trip)."""
    argv = ["--config=configs/sft_tiny.py", f"--workdir={tmp_path}", "--set=train.no_such_key=1", "--dry_run"]
    line = subprocess.run(
        [sys.executable, "experiments/launch.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    ).stdout.strip()
    proc = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr


def test_final_json_is_the_last_json_object_line():
    out = 'step 1/2 [###] loss=1\n{"a": 1}\nnoise {not json}\n{"loss": 0.5, "step": 2}\nI0000 log line\n'
    assert launch.final_json(out) == {"loss": 0.5, "step": 2}
    assert launch.final_json("no json here\n[1, 2]\n") is None


def test_a_failing_run_is_recorded_not_raised(tmp_path):
    run = runspec.RunSpec(
        config="configs/sft_tiny.py", workdir=str(tmp_path / "bad"), overrides=(("train.no_such_key", 1),), name="bad"
    )
    record = launch.run_local(run, timeout_s=120)
    assert record["status"] == "failed" and record["returncode"] not in (0, None)
    assert "no_such_key" in record["error"]
    assert json.loads((tmp_path / "bad" / "result.json").read_text()) == record


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(config="configs/sft_tiny", workdir="w"), "configs/\\*.py"),
        (dict(config="configs/sft_tiny.py", workdir=""), "workdir is empty"),
        (dict(config="configs/sft_tiny.py", workdir="w", overrides=(("--x", 1),)), "dotted config path"),
    ],
)
def test_bad_run_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        runspec.RunSpec(**kwargs)


def test_values_are_written_as_config_flags_parse_them():
    assert runspec.format_value(3e-4) == "0.0003"
    assert runspec.format_value(True) == "True"
    assert runspec.format_value((2, 2)) == "(2, 2)"
    assert runspec.format_value(["a.jsonl"]) == "('a.jsonl',)"  # quoted, or config_flags keeps one string
    with pytest.raises(ValueError, match="KEY=VALUE"):
        runspec.parse_override("novalue")


def test_xm_work_units_run_the_local_launcher():
    run = runspec.RunSpec(config="configs/grpo_tiny.py", workdir="/tmp/w", overrides=(("algo.clip_high", 0.28),))
    assert xm_launch.work_unit_argv(run) == [
        str(REPO_ROOT / "experiments" / "launch.py"),
        "--config=configs/grpo_tiny.py",
        "--workdir=/tmp/w",
        "--set=algo.clip_high=0.28",
    ]


def test_xm_work_unit_env_carries_the_environment_and_the_repository():
    env = xm_launch.work_unit_env({"HOME": "/h", "PYTHONPATH": "/x", "BASH_FUNC_f%%": "() {}"})
    assert env == {"HOME": "/h", "PYTHONPATH": f"{REPO_ROOT}:/x"}  # names xmanager refuses are left out
    assert xm_launch.work_unit_env({})["PYTHONPATH"] == str(REPO_ROOT)


@pytest.mark.skipif(importlib.util.find_spec("xmanager") is not None, reason="xmanager is installed")
def test_xm_launcher_without_the_extra_names_it(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/launch.py",
            "--config=configs/sft_tiny.py",
            f"--workdir={tmp_path}",
            "--launcher=xm",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "pip install -e '.[xm]'" in proc.stderr


XM_SWEEP = (
    "def get_sweep(arg=''):\n"
    "    return dict(config='configs/sft_tiny.py', grid={'optimizer.peak_lr': [0.001, 0.004]},\n"
    "                base={'train.steps': 1, 'synthetic.num_examples': 32, 'data.batch_size': 4,\n"
    "                      'data.seq_len': 64, 'export.hf': False, 'checkpoint.async_save': False},\n"
    "                metrics=('loss',))\n"
)


@pytest.mark.parametrize(
    "xmanager",
    [
        pytest.param("fake", marks=pytest.mark.slow),  # ~20 s: make test-slow
        pytest.param(
            "real",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("xmanager") is None, reason="needs the optional `xm` extra"
            ),
        ),
    ],
)
def test_xm_sweep_runs_as_one_local_experiment(tmp_path, monkeypatch, xmanager):
    """`sweep.py --launcher=xm`: one experiment, one work unit per point, each running the local launcher
    from outside the repository with only the environment it was handed; the summary reads their results."""
    sweep_file = tmp_path / "s.py"
    sweep_file.write_text(XM_SWEEP)
    argv = [f"--sweep={sweep_file}", f"--root={tmp_path}/r", "--launcher=xm"]
    if xmanager == "fake":
        fake = FakeXManager()
        monkeypatch.setattr(xm_launch, "_import_xmanager", fake.modules)
        assert sweep_lib.main(argv) == 0
        [experiment] = fake.experiments
        assert experiment.title == "polaris_jax sweep sweep"
        specs = sweep_lib.run_specs(sweep_lib.load_sweep(str(sweep_file)), f"{tmp_path}/r")
        assert [job["argv"] for job in experiment.jobs] == [
            [sys.executable] + xm_launch.work_unit_argv(spec) for spec in specs
        ]
        assert all(job["env"] == xm_launch.work_unit_env() and job["returncode"] == 0 for job in experiment.jobs)
    else:
        proc = subprocess.run(
            [sys.executable, "experiments/sweep.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (tmp_path / "r" / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and all(",ok," in line for line in summary[1:])
