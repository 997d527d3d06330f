"""tools/plots: one reader (metrics.jsonl + evals.jsonl, or TensorBoard events), the curves grid and one PNG per
metric, and the command line."""

import json
import os
import subprocess
import sys

import pytest

from polaris_jax.tools import plots


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _grpo_like_run(workdir, steps=5):
    """What the GRPO loop leaves: metrics.jsonl from the metric writer (with eval/pass_at_1 repeated) and
    evals.jsonl (step 0 included, a non-numeric field)."""
    from polaris_jax.train.metrics import MetricWriter

    writer = MetricWriter(str(workdir), total_steps=steps, console=False)
    for step in range(1, steps + 1):
        writer.write_scalars(
            step,
            {
                "reward_mean": step / 10,
                "accuracy": step / 10,
                "entropy": 1.0 / step,
                "learning_rate": 1e-3,
                "data/skipped": 0.0,
            },
        )
    writer.write_scalars(steps, {"eval/pass_at_1": 0.5})
    writer.close()
    with open(workdir / "evals.jsonl", "w") as f:
        for step, value in ((0, 0.25), (steps, 0.5)):
            f.write(json.dumps({"step": step, "pass@1": value, "example": "text"}) + "\n")


def test_metric_writer_output_becomes_pngs(tmp_path):
    _grpo_like_run(tmp_path)
    paths = plots.plot_run(str(tmp_path), smooth=0.5)
    assert paths[0] == str(tmp_path / "plots" / "curves.png")
    assert sorted(os.path.basename(p) for p in paths[1:]) == sorted(
        ["reward_mean.png", "accuracy.png", "entropy.png", "learning_rate.png", "data_skipped.png", "eval_pass@1.png"]
    )
    assert all(_is_png(p) for p in paths)
    series = plots.read_run(str(tmp_path))
    assert series["entropy"] == [(s, 1.0 / s) for s in range(1, 6)]
    assert series["eval/pass@1"] == [(0, 0.25), (5, 0.5)]  # from evals.jsonl, step 0 included
    assert "eval/pass_at_1" not in series  # metrics.jsonl's repeat of it is dropped
    assert "eval/example" not in series  # non-numeric fields are not curves


def test_training_curves_grid(tmp_path):
    _grpo_like_run(tmp_path)
    assert [title for title, _ in plots._key_panels(plots.read_run(str(tmp_path)))] == [
        "reward / accuracy",
        "held-out pass@1",
        "entropy",
    ]
    path = plots.plot_training_curves(str(tmp_path))
    assert path == str(tmp_path / "curves.png") and _is_png(path)
    assert not os.path.exists(path + ".tmp.png")
    (tmp_path / "empty").mkdir()
    assert plots.plot_training_curves(str(tmp_path / "empty")) is None  # a run that logged nothing


def test_tensorboard_events_only(tmp_path):
    """A run without metrics.jsonl is read from its event files (tensorboardX's writer)."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(tmp_path))
    for step in range(3):
        writer.add_scalar("reward_mean", 0.25 * step, step)
    writer.close()
    series = plots.read_run(str(tmp_path))
    assert series["reward_mean"] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert _is_png(plots.plot_training_curves(str(tmp_path)))


def test_cli(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 4):
            f.write(json.dumps({"step": step, "accuracy": step / 4, "loss": 1 / step}) + "\n")
        f.write('{"step": 4, "accur')  # a line cut off mid-write is ignored
    out = tmp_path / "pngs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "polaris_jax.tools.plots",
            f"--workdir={tmp_path}",
            f"--out={out}",
            "--metrics=accuracy",
            "--smooth=0.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"curves": str(out / "curves.png"), "plots": 1}
    assert _is_png(out / "accuracy.png") and _is_png(out / "curves.png")
    assert not (out / "loss.png").exists()


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.read_run(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.plot_training_curves(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no metrics"):
        plots.read_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\nnot json\n{"step": 3, "a": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        plots.read_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n')
    with pytest.raises(KeyError, match="were not logged"):
        plots.plot_run(str(tmp_path), metrics=["b"])
    with pytest.raises(ValueError, match="smooth"):
        plots.plot_run(str(tmp_path), smooth=1.0)


def _fake_job(config, workdir):
    from pathlib import Path

    _grpo_like_run(Path(workdir))
    return {"step": 5}


def test_main_draws_the_curves_after_a_job_that_asks(tmp_path, monkeypatch):
    import ml_collections

    from polaris_jax import main

    monkeypatch.setitem(main.JOBS, "fake", f"{__name__}:_fake_job")
    result = main.run_job(ml_collections.ConfigDict({"job": "fake", "plots": True}), str(tmp_path / "a"))
    assert result == {"step": 5, "curves_png": str(tmp_path / "a" / "curves.png")}
    assert _is_png(result["curves_png"])
    assert main.run_job(ml_collections.ConfigDict({"job": "fake", "plots": False}), str(tmp_path / "b")) == {"step": 5}
    assert not (tmp_path / "b" / "curves.png").exists()
