"""plot_metrics: PNG curves from metrics.jsonl (the metric writer's own output) or TensorBoard events."""

import json
import os
import subprocess
import sys

import pytest

from polaris_jax.tools import plot_metrics


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_metric_writer_output_becomes_pngs(tmp_path):
    from polaris_jax.train.metrics import MetricWriter
    writer = MetricWriter(str(tmp_path), total_steps=5, console=False)
    for step in range(1, 6):
        writer.write_scalars(step, {"loss": 3.0 / step, "learning_rate": 1e-3, "data/skipped": 0.0})
    writer.close()
    with open(tmp_path / "evals.jsonl", "w") as f:
        f.write(json.dumps({"step": 5, "pass@1": 0.5, "split": "heldout"}) + "\n")
    paths = plot_metrics.plot_run(str(tmp_path), smooth=0.5)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(["overview.png", "loss.png", "learning_rate.png", "data_skipped.png",
                            "eval_pass@1.png"])
    assert all(_is_png(p) for p in paths)
    series = plot_metrics.read_run(str(tmp_path))
    assert series["loss"] == [(s, 3.0 / s) for s in range(1, 6)]
    assert "eval/split" not in series  # non-numeric fields are not curves


def test_tensorboard_events_only(tmp_path):
    """A run without metrics.jsonl is read from its event files (tensorboardX's writer)."""
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(logdir=str(tmp_path))
    for step in range(3):
        writer.add_scalar("reward_mean", 0.25 * step, step)
    writer.close()
    series = plot_metrics.read_run(str(tmp_path))
    assert series["reward_mean"] == [(0, 0.0), (1, 0.25), (2, 0.5)]


def test_cli(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 4):
            f.write(json.dumps({"step": step, "accuracy": step / 4}) + "\n")
        f.write('{"step": 4, "accur')  # a line cut off mid-write is ignored
    out = tmp_path / "pngs"
    proc = subprocess.run([sys.executable, "-m", "polaris_jax.tools.plot_metrics", f"--workdir={tmp_path}", f"--out={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"overview": str(out / "overview.png"), "plots": 1}
    assert _is_png(out / "accuracy.png")


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_metrics.read_run(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no metrics"):
        plot_metrics.read_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\nnot json\n{"step": 3, "a": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        plot_metrics.read_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n')
    with pytest.raises(KeyError, match="were not logged"):
        plot_metrics.plot_run(str(tmp_path), metrics=["b"])
