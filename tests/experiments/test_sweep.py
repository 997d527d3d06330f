"""Sweeps: grid / zipped expansion, the summary table, and a real 6-point sweep of the tiny SFT config
(4 points train, 2 fail on a bad override value) run locally two at a time."""

import csv
import math
import pathlib
import subprocess
import sys
import textwrap

import pytest

from experiments import sweep as sweep_lib
from tests.config_files import config_module

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_grid_is_a_cartesian_product_slowest_axis_first():
    s = sweep_lib.Sweep(config="configs/x.py", base={"train.steps": 3}, grid={"a.lr": [1, 2], "b.g": [4, 8, 16]})
    points = s.points()
    assert len(points) == 6
    assert [(p["a.lr"], p["b.g"]) for p in points] == [(1, 4), (1, 8), (1, 16), (2, 4), (2, 8), (2, 16)]
    assert all(p["train.steps"] == 3 for p in points)


def test_zipped_lists_advance_together_as_one_more_axis():
    s = sweep_lib.Sweep(config="configs/x.py", grid={"a": [1, 2]}, zipped={"b": [10, 20, 30], "c": ["x", "y", "z"]})
    points = s.points()
    assert len(points) == 6
    assert [(p["a"], p["b"], p["c"]) for p in points[:3]] == [(1, 10, "x"), (1, 20, "y"), (1, 30, "z")]
    assert s.swept_keys == ["a", "b", "c"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(zipped={"a": [1, 2], "b": [1]}), "one length"),
        (dict(grid={"a": [1]}, zipped={"a": [2]}), "more than one"),
        (dict(base={"a": 1}, grid={"a": [2]}), "more than one"),
        (dict(grid={"a": []}), "non-empty list"),
        (dict(grid={"a": "123"}), "non-empty list"),
    ],
)
def test_bad_sweeps_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sweep_lib.Sweep(config="configs/x.py", **kwargs)


def test_point_names_are_unique_and_path_safe(tmp_path):
    s = sweep_lib.Sweep(
        config="configs/x.py",
        grid={"optimizer.peak_lr": [1e-4, 3e-4]},
        zipped={"data.sources": [("a/b.jsonl",), ("c d.jsonl",)]},
    )
    specs = sweep_lib.run_specs(s, str(tmp_path))
    names = [spec.name for spec in specs]
    assert len(set(names)) == 4 and all("/" not in n and " " not in n for n in names)
    assert names[0].startswith("000-peak_lr=0.0001-sources=")
    assert all(pathlib.Path(spec.workdir).parent == tmp_path for spec in specs)


def test_summary_table_from_records(tmp_path):
    s = sweep_lib.Sweep(config="configs/x.py", grid={"a.lr": [0.1, 0.2]}, metrics=("acc",))
    specs = sweep_lib.run_specs(s, str(tmp_path))
    records = [{"status": "ok", "metrics": {"acc": 0.5, "other": 1}, "seconds": 3.0}, None]
    header, rows = sweep_lib.summary_table(s, specs, records)
    assert header == ["point", "status", "lr", "acc", "seconds", "workdir"]
    assert rows[0][1:4] == ["ok", "0.1", 0.5] and rows[1][1:4] == ["missing", "0.2", ""]
    md = sweep_lib.to_markdown(header, rows)
    assert md.splitlines()[0] == "| point | status | lr | acc | seconds | workdir |"
    assert "| 0.5 |" in md


SWEEP_FILE = textwrap.dedent("""
    def get_sweep(arg=""):
        return dict(
            name="sft_tiny_test",
            config="configs/sft_tiny.py",
            base={"train.steps": 2, "synthetic.num_examples": 64, "data.batch_size": 4, "data.seq_len": 96,
                  "train.log_every": 1, "export.hf": False, "checkpoint.async_save": False},
            grid={"optimizer.peak_lr": [0.001, 0.004]},
            zipped={"train.microbatches": [1, 2, "two"]},
            metrics=("loss", "learning_rate", "step"),
        )
""")


@pytest.fixture(scope="module")
def sft_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    sweep_file = root / "sft_tiny_sweep.py"
    sweep_file.write_text(SWEEP_FILE)
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/sweep.py",
            f"--sweep={sweep_file}",
            f"--root={root}/runs",
            "--parallel=2",
            "--timeout_s=300",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    with open(root / "runs" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    return proc, rows, root / "runs"


@pytest.mark.slow  # about 1.5 min on 2 cores (six SFT runs): `make test-slow`, which .ci/run also runs
def test_sweep_runs_every_point_and_writes_the_summary(sft_sweep):
    proc, rows, root = sft_sweep
    assert proc.returncode == 1, "a sweep with failed points exits non-zero"  # after finishing the others
    assert len(rows) == 6
    assert [r["peak_lr"] for r in rows] == ["0.001"] * 3 + ["0.004"] * 3
    assert [r["microbatches"] for r in rows] == ["1", "2", "two"] * 2
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 4, proc.stdout + proc.stderr
    assert all(r["microbatches"] != "two" for r in ok)
    assert all(r["status"] == "failed" for r in rows if r["microbatches"] == "two")
    assert all(int(r["step"]) == 2 and math.isfinite(float(r["loss"])) for r in ok)
    # The lr each run reports is its own peak_lr on the same warmup-cosine schedule (same step), so the
    # ratio reported / peak is one number across points: each point really got its override.
    ratios = {round(float(r["learning_rate"]) / float(r["peak_lr"]), 6) for r in ok}
    assert len(ratios) == 1 and 0 < ratios.pop() <= 1
    assert (root / "summary.md").read_text().count("\n") == 8  # header, rule, 6 rows
    for r in rows:
        assert (pathlib.Path(r["workdir"]) / "result.json").exists()
        assert (pathlib.Path(r["workdir"]) / "stdout.log").exists()


@pytest.mark.slow  # shares the sweep above
def test_failed_point_records_its_error(sft_sweep):
    _, rows, _ = sft_sweep
    import json

    failed = [r for r in rows if r["status"] == "failed"]
    record = json.loads((pathlib.Path(failed[0]["workdir"]) / "result.json").read_text())
    assert record["returncode"] not in (0, None)
    assert "two" in record["error"] or "microbatches" in record["error"]


def test_dry_run_prints_one_exact_command_per_point(tmp_path):
    sweep_file = tmp_path / "s.py"
    sweep_file.write_text(SWEEP_FILE)
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/sweep.py",
            f"--sweep={sweep_file}",
            f"--root={tmp_path}/r",
            "--dry_run",
            "--set=seed=3",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 6
    assert lines[0].startswith(f"cd {REPO_ROOT} && {sys.executable} -m polaris_jax.main --config=configs/sft_tiny.py ")
    assert f"--workdir={tmp_path}/r/000-peak_lr=0.001-microbatches=1 " in lines[0]
    assert lines[0].endswith("--config.optimizer.peak_lr=0.001 --config.train.microbatches=1 --config.seed=3")
    assert not (tmp_path / "r").exists()  # nothing ran


@pytest.mark.parametrize(
    "spec", ["experiments/sweeps/grpo_tiny_sweep.py", "experiments/sweeps/grpo_tiny_sweep.py:smoke"]
)
def test_grpo_tiny_sweep_overrides_exist_in_its_config(spec):
    """Every key the example sweep sets is a field of configs/grpo_tiny.py (a locked config refuses others)."""

    s = sweep_lib.load_sweep(str(REPO_ROOT / spec.split(":")[0]) + (":" + spec.split(":")[1] if ":" in spec else ""))
    assert len(s.points()) >= 4
    config = config_module(pathlib.Path(s.config).stem).get_config()
    for key in {k for point in s.points() for k in point}:
        node = config
        for part in key.split(".")[:-1]:
            node = node[part]
        assert key.rsplit(".", 1)[-1] in node, key
