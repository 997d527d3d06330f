"""PNG training curves of a run: `python -m polaris_jax.tools.plot_metrics --workdir=DIR [--out=DIR/plots]`.

Reads the scalars the metric writer logged (`train/metrics.py`): WORKDIR/metrics.jsonl (one
{"step": s, name: value, ...} object per line) and, when present, WORKDIR/evals.jsonl; a run that
has only TensorBoard event files (events.out.tfevents.*) is read from those instead. Writes one PNG
per metric (`<name>.png`, '/' becomes '_') and an `overview.png` grid of them all, atomically.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
from collections import defaultdict

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl or TensorBoard events.")
_OUT = flags.DEFINE_string("out", "", "Where the PNGs go (default: WORKDIR/plots).")
_METRICS = flags.DEFINE_list("metrics", [], "Only these metric names (default: every scalar logged).")
_SMOOTH = flags.DEFINE_float("smooth", 0.0, "Exponential moving average weight in [0, 1) drawn over the raw curve.")

Series = dict[str, list[tuple[int, float]]]


def _add(series: Series, step, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return
    series[name].append((int(step), float(value)))


def read_jsonl_series(path: str, prefix: str = "") -> Series:
    """{name: [(step, value)]} from a jsonl of {"step": s, ...} objects; non-numeric fields are skipped."""
    series: Series = defaultdict(list)
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line of a run that is still writing may be cut off
                break
            raise ValueError(f"{path}: line {number} is not JSON") from None
        if "step" not in row:
            raise ValueError(f"{path}: line {number} has no 'step' field")
        for name, value in row.items():
            if name != "step":
                _add(series, row["step"], prefix + name, value)
    return series


def _records(path: str):
    """Payloads of a TFRecord file (length, crc, data, crc); CRCs are not checked."""
    with open(path, "rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            f.read(4)
            if len(data) < length:
                return
            yield data


def read_event_series(workdir: str) -> Series:
    """Scalars from TensorBoard event files (simple_value or scalar tensor summaries)."""
    from tensorboardX.proto import event_pb2
    series: Series = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True)):
        for payload in _records(path):
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    _add(series, event.step, value.tag, value.simple_value)
                elif value.HasField("tensor") and value.tensor.float_val:
                    _add(series, event.step, value.tag, value.tensor.float_val[0])
    return series


def read_run(workdir: str) -> Series:
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    jsonl = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(jsonl):
        series = read_jsonl_series(jsonl)
        evals = os.path.join(workdir, "evals.jsonl")
        if os.path.exists(evals):
            series.update(read_jsonl_series(evals, prefix="eval/"))
    else:
        series = read_event_series(workdir)
    if not series:
        raise FileNotFoundError(f"no metrics in {workdir}: expected metrics.jsonl or TensorBoard event files")
    return {name: sorted(points) for name, points in series.items()}


def ema(values: list[float], weight: float) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def _draw(ax, name: str, points, smooth: float) -> None:
    steps, values = [p[0] for p in points], [p[1] for p in points]
    few = len(steps) < 12
    ax.plot(steps, values, marker="o" if few else None, markersize=3, alpha=0.35 if smooth else 1.0, label=name)
    if smooth:
        ax.plot(steps, ema(values, smooth), label=f"{name} (ema {smooth})")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@=+-]", "_", metric) + ".png"


def plot_run(workdir: str, out_dir: str = "", metrics=(), smooth: float = 0.0) -> list[str]:
    """Writes the PNGs; returns their paths (overview first)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    series = read_run(workdir)
    if metrics:
        missing = sorted(set(metrics) - set(series))
        if missing:
            raise KeyError(f"metrics {missing} were not logged; logged: {sorted(series)}")
        series = {name: series[name] for name in metrics}
    out_dir = out_dir or os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, points in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        _draw(ax, name, points, smooth)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, file_name(name)))
        _save(fig, paths[-1])
        plt.close(fig)
    cols = min(4, len(series))
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, sorted(series.items())):
        _draw(ax, name, points, smooth)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    overview = os.path.join(out_dir, "overview.png")
    _save(fig, overview)
    plt.close(fig)
    return [overview] + paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    paths = plot_run(_WORKDIR.value, _OUT.value, _METRICS.value, _SMOOTH.value)
    print(json.dumps({"overview": paths[0], "plots": len(paths) - 1}))


if __name__ == "__main__":
    app.run(main)
