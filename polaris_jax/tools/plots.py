"""PNG training curves of a run (matplotlib, no display).

    python -m polaris_jax.tools.plots --workdir=DIR [--out=DIR/plots] [--metrics=loss,accuracy] [--smooth=0.6]

One reader, `read_run`: the scalars the metric writer logged (`train/metrics.py`), from WORKDIR/metrics.jsonl
(one {"step": s, name: value, ...} object per line) and, when present, WORKDIR/evals.jsonl (as `eval/NAME`);
a run that has only TensorBoard event files (events.out.tfevents.*) is read from those instead.
One drawing path, `_grid`: panels of curves, each panel one or more metrics, optionally smoothed.
Two products of it:
  `plot_training_curves(workdir)`: WORKDIR/curves.png, the key GRPO curves on one grid (`PANELS`, those the
      run logged); what `polaris_jax.main` writes at the end of a run whose config sets `plots`.
  `plot_run(workdir, out_dir)`: OUT/curves.png as above (or one panel per metric asked for) and one PNG per
      metric (`<name>.png`, '/' becomes '_'); the command line.
Every PNG is written atomically.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import re
import struct
import sys
from collections import defaultdict
from collections.abc import Sequence

from polaris_jax.files import write_atomic

Series = dict[str, list[tuple[int, float]]]

# The curves grid: title -> metrics drawn together (those a run did not log are left out).
PANELS = (
    ("reward / accuracy", ("reward_mean", "accuracy")),
    ("held-out pass@1", ("eval/pass@1",)),
    ("groups", ("frac_all_correct_groups", "frac_all_wrong_groups")),
    ("response length", ("response_len_mean", "response_len_max")),
    ("entropy", ("entropy",)),
    ("clip fraction", ("clip_fraction",)),
    ("approx KL", ("approx_kl", "kl_to_ref")),
    ("seconds per step", ("time_rollout", "time_reward", "time_update")),
    ("loss", ("loss", "ce_loss")),
)
# metrics.jsonl names that repeat an evals.jsonl series (the GRPO loop logs both); read from evals.jsonl only.
_REPEATS = {"eval/pass_at_1": "eval/pass@1"}


# -- reading ----------------------------------------------------------------------------------------------


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
    """Every scalar a run logged, {name: [(step, value)] sorted by step}; raises if it logged none."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    jsonl = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(jsonl):
        series = read_jsonl_series(jsonl)
        evals = os.path.join(workdir, "evals.jsonl")
        if os.path.exists(evals):
            series.update(read_jsonl_series(evals, prefix="eval/"))
            for repeat, name in _REPEATS.items():
                if name in series:
                    series.pop(repeat, None)
    else:
        series = read_event_series(workdir)
    if not series:
        raise FileNotFoundError(f"no metrics in {workdir}: expected metrics.jsonl or TensorBoard event files")
    return {name: sorted(points) for name, points in series.items()}


# -- drawing ----------------------------------------------------------------------------------------------


def ema(values: Sequence[float], weight: float) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def _grid(panels: Sequence[tuple[str, Series]], path: str, smooth: float = 0.0, cols: int = 3) -> str:
    """Draws one panel per (title, {name: points}) on a grid of `cols` columns and writes it to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(cols, len(panels))
    rows = -(-len(panels) // cols)
    width, height = (5.0, 3.2) if len(panels) == 1 else (4.2, 2.8)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels):
        for name, points in curves.items():
            steps, values = [p[0] for p in points], [p[1] for p in points]
            (line,) = ax.plot(
                steps,
                values,
                marker="o" if len(steps) < 12 else None,
                markersize=3,
                alpha=0.35 if smooth else 1.0,
                label=name,
            )
            if smooth:
                ax.plot(steps, ema(values, smooth), color=line.get_color(), label=f"{name} (ema {smooth})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(curves) > 1 or smooth:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path


def _key_panels(series: Series) -> list[tuple[str, Series]]:
    panels = [(title, {n: series[n] for n in names if n in series}) for title, names in PANELS]
    return [(title, curves) for title, curves in panels if curves]


def file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@=+-]", "_", metric) + ".png"


def plot_training_curves(workdir: str, path: str | None = None, smooth: float = 0.0) -> str | None:
    """WORKDIR/curves.png (or `path`): the key curves of `PANELS` the run logged. Returns its path, or None
    when the run logged none of them (or nothing at all)."""
    try:
        series = read_run(workdir)
    except FileNotFoundError:
        if not os.path.isdir(workdir):
            raise
        return None
    panels = _key_panels(series)
    return _grid(panels, path or os.path.join(workdir, "curves.png"), smooth) if panels else None


def plot_run(workdir: str, out_dir: str = "", metrics: Sequence[str] = (), smooth: float = 0.0) -> list[str]:
    """Writes OUT/curves.png and one OUT/<metric>.png per metric (OUT defaults to WORKDIR/plots); returns
    their paths, curves.png first. The grid holds the key curves (`PANELS`), or one panel per metric in
    `metrics` when that is given (or when the run logged none of the key curves)."""
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
    one_each = [(name, {name: points}) for name, points in sorted(series.items())]
    key = [] if metrics else _key_panels(series)
    paths = [_grid(key or one_each, os.path.join(out_dir, "curves.png"), smooth, cols=3 if key else 4)]
    paths += [_grid([panel], os.path.join(out_dir, file_name(panel[0])), smooth) for panel in one_each]
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m polaris_jax.tools.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="run directory holding metrics.jsonl or TensorBoard events")
    parser.add_argument("--out", default="", help="where the PNGs go (default: WORKDIR/plots)")
    parser.add_argument("--metrics", default="", help="comma-separated metric names (default: every scalar logged)")
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="exponential moving average weight in [0, 1) drawn over the raw curves",
    )
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    paths = plot_run(args.workdir, args.out, metrics, args.smooth)
    print(json.dumps({"curves": paths[0], "plots": len(paths) - 1}))


if __name__ == "__main__":
    main(sys.argv[1:])
