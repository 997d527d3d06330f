"""Launch a config: run it locally, or as an xmanager experiment (one work unit per run).

    python experiments/launch.py --config=configs/sft_tiny.py --workdir=runs/sft_tiny
    python experiments/launch.py --config=configs/sft_tiny.py:lora --workdir=runs/lora \
        --set=train.steps=50 --set=optimizer.peak_lr=1e-2
    python experiments/launch.py ... --dry_run            # print the exact command line, run nothing
    python experiments/launch.py ... --launcher=xm        # needs the `xm` extra: pip install -e .[xm]

A run is `python -m polaris_jax.main --config=C --workdir=W --config.k=v ...` started from the
repository root. Its stdout and stderr go to W/stdout.log and W/stderr.log; the final JSON line the
entry point prints is parsed into W/result.json with the exit status, which is what sweeps read.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

if __name__ == "__main__":  # run as a script: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.runspec import (
    REPO_ROOT,
    RESULT_FILE,
    RunSpec,
    command,
    format_value,
    parse_override,
    read_result,
    shell_line,
)
from polaris_jax.files import write_atomic


def final_json(stdout_text: str) -> dict | None:
    """The last line of a run's stdout that is a JSON object: the entry point's final metrics."""
    for line in reversed(stdout_text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def run_local(
    run: RunSpec, *, python: str = sys.executable, env: Mapping[str, str] | None = None, timeout_s: float | None = None
) -> dict:
    """Runs one config to completion in a subprocess; returns (and writes) its result record.

    The record is {name, status: ok | failed | timeout, returncode, seconds, metrics, overrides,
    command}; a failure never raises, so one bad run cannot stop its neighbours in a sweep."""
    os.makedirs(run.workdir, exist_ok=True)
    argv = command(run, python)
    start = time.monotonic()
    with (
        open(os.path.join(run.workdir, "stdout.log"), "w") as out,
        open(os.path.join(run.workdir, "stderr.log"), "w") as err,
    ):
        try:
            proc = subprocess.run(
                argv,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=err,
                timeout=timeout_s,
                env=dict(os.environ if env is None else env),
            )
            status, returncode = ("ok" if proc.returncode == 0 else "failed"), proc.returncode
        except subprocess.TimeoutExpired:
            status, returncode = "timeout", None
    with open(os.path.join(run.workdir, "stdout.log")) as f:
        metrics = final_json(f.read())
    if status == "ok" and metrics is None:
        status = "failed"  # finished without its final metrics line
    record = {
        "name": run.name or os.path.basename(os.path.normpath(run.workdir)),
        "status": status,
        "returncode": returncode,
        "seconds": round(time.monotonic() - start, 1),
        "metrics": metrics or {},
        "overrides": {k: format_value(v) for k, v in run.overrides},
        "config": run.config,
        "command": shlex.join(argv),
    }
    if status != "ok":
        record["error"] = _last_error_line(os.path.join(run.workdir, "stderr.log"))
    write_atomic(os.path.join(run.workdir, RESULT_FILE), json.dumps(record, indent=2, sort_keys=True, default=str))
    return record


def _last_error_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [""])[-1][:500]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py[:arg]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable (becomes --config.KEY=VALUE)",
    )
    parser.add_argument("--launcher", choices=("local", "xm"), default="local")
    parser.add_argument("--dry_run", action="store_true", help="print the command line and exit")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs polaris_jax.main")
    args = parser.parse_args(argv)
    run = RunSpec(config=args.config, workdir=args.workdir, overrides=tuple(parse_override(s) for s in args.set))
    if args.dry_run:
        print(shell_line(command(run, args.python)))
        return 0
    if args.launcher == "xm":
        from experiments import xm_launch

        xm_launch.launch([run], title=f"polaris_jax {os.path.basename(run.workdir)}", python=args.python)
        record = read_result(run.workdir) or {"status": "failed", "metrics": {}}
    else:
        record = run_local(run, python=args.python)
    print(json.dumps(record, sort_keys=True))
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
