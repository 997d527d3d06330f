"""GRPO loop rows on the CPU demo's config: synchronous on `generate`, synchronous on the engine,
asynchronous on the engine (rollout.max_staleness=1, TIS), and that with packed updates (algo.pack_tokens);
prints one JSON line per row and the ratios.

    .venv/bin/python benchmarks/grpo_async.py [--workdir=DIR] [--steps=60] [--rows=static,engine,engine_k1]
    .venv/bin/python benchmarks/grpo_async.py --workload=long_tail [--steps=10]

Workloads: `demo` is `make demo`'s GRPO phase. `long_tail` is one stage of 10 steps whose response lengths
are forced to a lognormal spread of 20x (`rollout.length_spread=20`: EOS ignored, a seeded per-prompt
max_new_tokens, the longest 256 tokens), group 8: the long tail that a static batch waits for.

The task and the SFT warm start are made once (as `make demo` makes them, under --workdir, reused when
present); each row then runs the demo's GRPO phase from that checkpoint with the same seed and data.
Reported per row: the median wall time of a step after the first (rollout + update, or the wait for
rollouts + update when asynchronous), the share of a step the learner waited for rollouts, held-out
pass@1 before and after, and the GRPO phase's wall time. Meant for this 2-core CPU VM; the rows run one
after another on the same machine, so their ratios compare like with like.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS = {
    "static": {"rollout.backend": "static"},
    "engine": {"rollout.backend": "engine"},
    "engine_k1": {"rollout.backend": "engine", "rollout.max_staleness": 1, "algo.off_policy": "tis"},
    # ... and the update packed into rows of the longest sequence (train/grpo/packing.py)
    "engine_k1_packed": {
        "rollout.backend": "engine",
        "rollout.max_staleness": 1,
        "algo.off_policy": "tis",
        "algo.pack_tokens": "longest",
    },
}


def _demo_config():
    spec = importlib.util.spec_from_file_location("grpo_tiny", os.path.join(ROOT, "configs", "grpo_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("")


def _set(config, key: str, value) -> None:
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
        node = node[parent]
    node[leaf] = value


def _warm_start(config, workdir: str) -> tuple[dict, str]:
    from polaris_jax.tools import demo
    from polaris_jax.train.sft import loop as sft_loop

    paths = demo.write_task(config, os.path.join(workdir, "data"))
    export = os.path.join(workdir, "sft", "export", "hf")
    if not os.path.exists(os.path.join(export, "config.json")):
        export = sft_loop.run(demo.sft_config(config, paths), os.path.join(workdir, "sft"))["export_dir"]
    return paths, export


WORKLOADS = {
    "demo": {},
    "long_tail": {
        "rollout.length_spread": 20.0,
        "schedule.max_response_len": (256,),
        "schedule.temperature": (1.0,),
        "schedule.steps": (10,),
        "eval.every": 0,
        "train.log_every": 1,  # per-step times: the median leaves out the first (compiling) step
    },
}


def _row(config, paths: dict, export: str, name: str, steps: int, workdir: str, workload: str) -> dict:
    from polaris_jax.tools import demo
    from polaris_jax.train.grpo import loop as grpo_loop

    grpo = demo.grpo_config(config, paths, export)
    with grpo.unlocked():
        if workload == "long_tail":
            grpo.schedule.datasets = grpo.schedule.datasets[:1]
        for key, value in {**WORKLOADS[workload], **ROWS[name]}.items():
            if value == "longest":
                value = grpo.data.max_prompt_len + max(grpo.schedule.max_response_len)
            _set(grpo, key, value)
        grpo.schedule.steps = tuple(max(1, s * steps // sum(grpo.schedule.steps)) for s in grpo.schedule.steps)
        grpo.plots, grpo.export.hf = False, False
    out_dir = os.path.join(workdir, f"grpo_{workload}_{name}")
    started = time.perf_counter()
    result = grpo_loop.run(grpo, out_dir)
    seconds = time.perf_counter() - started
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"time_step"' in line]
    step_s = [r["time_step"] for r in rows[1:]] or [r["time_step"] for r in rows]
    return {
        "row": name,
        "workload": workload,
        "overrides": ROWS[name],
        "steps": len(rows),
        "step_s_median": statistics.median(step_s),
        "wait_fraction_mean": statistics.mean(r.get("rollout/wait_fraction", 0.0) for r in rows),
        "accuracy_before": result.get("accuracy_before"),
        "accuracy_after": result.get("accuracy_after"),
        "grpo_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/polaris_grpo_async_bench")
    parser.add_argument("--workload", default="demo", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=0, help="GRPO steps per row (0: the workload's: 60 or 10)")
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args()
    names = [n for n in args.rows.split(",") if n]
    unknown = set(names) - set(ROWS)
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)}; choose from {sorted(ROWS)}")
    config = _demo_config()
    paths, export = _warm_start(config, args.workdir)
    results = {}
    for name in names:
        steps = args.steps or sum(WORKLOADS[args.workload].get("schedule.steps", config.schedule.steps))
        results[name] = _row(config, paths, export, name, steps, args.workdir, args.workload)
        print(json.dumps(results[name]), flush=True)
    base = results.get("static")
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "speedup_vs_static": {
            n: base["step_s_median"] / r["step_s_median"] for n, r in results.items() if base and n != "static"
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
