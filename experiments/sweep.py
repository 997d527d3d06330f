"""Sweeps over config overrides: grid and zipped lists, one workdir per point, one summary table.

    python experiments/sweep.py --sweep=experiments/sweeps/grpo_tiny_sweep.py --root=runs/grpo_sweep
    python experiments/sweep.py --sweep=... --root=... --parallel=2        # two points at a time
    python experiments/sweep.py --sweep=... --root=... --dry_run           # print every command line
    python experiments/sweep.py --sweep=... --root=... --launcher=xm       # one xmanager experiment

A sweep file defines `get_sweep(arg="") -> dict` with keys
    config   configs/NAME.py[:arg] that every point runs
    base     {key: value} overrides applied to every point
    grid     {key: [values]}: the cartesian product of these lists
    zipped   {key: [values]}: lists of one length, advanced together (one more grid axis)
    metrics  final-metric names to tabulate (default: every name some point reported)
Points run as separate processes (`experiments/launch.py`); one that fails is recorded as failed
and the others carry on. ROOT/summary.csv and ROOT/summary.md hold one row per point: its status,
the values it swept and the final metrics parsed from the JSON line its run printed last.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import importlib.util
import io
import itertools
import os
import re
import sys
from collections.abc import Sequence

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.launch import run_local
from experiments.runspec import RunSpec, command, format_value, parse_override, read_result, shell_line
from polaris_jax.files import write_atomic


@dataclasses.dataclass(frozen=True)
class Sweep:
    config: str
    base: dict = dataclasses.field(default_factory=dict)
    grid: dict = dataclasses.field(default_factory=dict)
    zipped: dict = dataclasses.field(default_factory=dict)
    metrics: tuple = ()
    name: str = "sweep"

    def __post_init__(self):
        for key, values in {**self.grid, **self.zipped}.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"sweep axis {key!r} needs a non-empty list of values, got {values!r}")
        lengths = {len(v) for v in self.zipped.values()}
        if len(lengths) > 1:
            raise ValueError(f"zipped lists must have one length, got { {k: len(v) for k, v in self.zipped.items()} }")
        shared = set(self.grid) & set(self.zipped) | (set(self.base) & (set(self.grid) | set(self.zipped)))
        if shared:
            raise ValueError(f"keys {sorted(shared)} appear in more than one of base / grid / zipped")

    @property
    def swept_keys(self) -> list[str]:
        return list(self.grid) + list(self.zipped)

    def points(self) -> list[dict]:
        """Override dicts, one per point: grid axes vary slowest-first, the zipped group last."""
        grid_axes = [[(key, v) for v in values] for key, values in self.grid.items()]
        if self.zipped:
            count = len(next(iter(self.zipped.values())))
            grid_axes.append([tuple((key, self.zipped[key][i]) for key in self.zipped) for i in range(count)])
        out = []
        for combo in itertools.product(*grid_axes):
            point = dict(self.base)
            for item in combo:
                point.update(dict(item) if isinstance(item[0], tuple) else {item[0]: item[1]})
            out.append(point)
        return out


def load_sweep(spec: str) -> Sweep:
    """`path/to/sweep.py[:arg]` -> Sweep, via the file's `get_sweep(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"sweep file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_sweep_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise AttributeError(f"sweep file {path} defines no get_sweep(arg)")
    fields = module.get_sweep(arg) if arg else module.get_sweep()
    unknown = set(fields) - {f.name for f in dataclasses.fields(Sweep)}
    if unknown:
        raise ValueError(f"sweep file {path}: unknown keys {sorted(unknown)}")
    return Sweep(**{**fields, "metrics": tuple(fields.get("metrics", ()))})


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def point_name(index: int, point: dict, swept_keys: Sequence[str]) -> str:
    """'003-peak_lr=0.0003-group_size=8': the index keeps names unique and sorted."""
    parts = [f"{_short(k)}={format_value(point[k])}" for k in swept_keys]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join([f"{index:03d}"] + parts))


def run_specs(sweep: Sweep, root: str, extra: dict | None = None) -> list[RunSpec]:
    specs = []
    for i, point in enumerate(sweep.points()):
        name = point_name(i, point, sweep.swept_keys)
        overrides = {**point, **(extra or {})}
        specs.append(
            RunSpec(
                config=sweep.config, workdir=os.path.join(root, name), overrides=tuple(overrides.items()), name=name
            )
        )
    return specs


def run_all_local(
    specs: Sequence[RunSpec], parallel: int = 1, timeout_s: float | None = None, python: str = sys.executable, log=print
) -> list[dict]:
    """Runs every point, `parallel` at a time; returns their records in the order of `specs`."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(run_local, spec, python=python, timeout_s=timeout_s): spec for spec in specs}
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            log(
                f"[{record['status']:>7}] {record['name']} ({record['seconds']} s)"
                + (f": {record['error']}" if record.get("error") else "")
            )
    return [read_result(spec.workdir) for spec in specs]


def summary_table(sweep: Sweep, specs: Sequence[RunSpec], records: Sequence[dict | None]):
    """(header, rows): one row per point, with its swept values and final metrics."""
    metrics = list(sweep.metrics)
    if not metrics:
        names = {k for r in records if r for k, v in r["metrics"].items() if isinstance(v, (int, float))}
        metrics = sorted(names)
    header = ["point", "status"] + [_short(k) for k in sweep.swept_keys] + metrics + ["seconds", "workdir"]
    rows = []
    for spec, record in zip(specs, records):
        record = record or {"status": "missing", "metrics": {}, "seconds": ""}
        overrides = dict(spec.overrides)
        rows.append(
            [spec.name, record["status"]]
            + [format_value(overrides[k]) for k in sweep.swept_keys]
            + [record["metrics"].get(m, "") for m in metrics]
            + [record.get("seconds", ""), spec.workdir]
        )
    return header, rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def to_markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(header, rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_summary(root: str, header, rows) -> tuple[str, str]:
    os.makedirs(root, exist_ok=True)
    csv_path, md_path = os.path.join(root, "summary.csv"), os.path.join(root, "summary.md")
    write_atomic(csv_path, to_csv(header, rows))
    write_atomic(md_path, to_markdown(header, rows))
    return csv_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", required=True, help="experiments/sweeps/NAME.py[:arg]")
    parser.add_argument("--root", required=True, help="directory holding one workdir per point")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every point (after the sweep's own), repeatable",
    )
    parser.add_argument("--parallel", type=int, default=1, help="points run at once (local launcher)")
    parser.add_argument("--timeout_s", type=float, default=None, help="per-point time limit (local launcher)")
    parser.add_argument("--launcher", choices=("local", "xm"), default="local")
    parser.add_argument("--dry_run", action="store_true", help="print every point's command line and exit")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)

    sweep = load_sweep(args.sweep)
    specs = run_specs(sweep, args.root, dict(parse_override(s) for s in args.set))
    if args.dry_run:
        for spec in specs:
            print(shell_line(command(spec, args.python)))
        return 0
    print(f"sweep {sweep.name}: {len(specs)} points under {args.root}", flush=True)
    if args.launcher == "xm":
        from experiments import xm_launch

        xm_launch.launch(specs, title=f"polaris_jax sweep {sweep.name}", python=args.python)
        records = [read_result(spec.workdir) for spec in specs]
    else:
        records = run_all_local(specs, args.parallel, args.timeout_s, args.python)
    header, rows = summary_table(sweep, specs, records)
    csv_path, md_path = write_summary(args.root, header, rows)
    print(to_markdown(header, rows))
    print(f"wrote {csv_path} and {md_path}")
    return 0 if all(r and r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
