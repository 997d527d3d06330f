"""GRPO step-time breakdown on the tiny demo shapes: rollout, reward, update; prints one JSON line.

    .venv/bin/python benchmarks/grpo_step.py [--steps=8] [--warmup=2]

Model and rollout shapes are configs/grpo_tiny.py's (Qwen3 architecture, hidden 128, 2 layers,
16 prompts x 8 samples, up to 40-token responses, PPO-clip token-mean, one update per step), with
random weights (responses end at a sampled EOS, so they are shorter than the demo's ~27 tokens; the
update's shapes are fixed at the maximum either way). Reported: medians over the timed steps of each
part of the loop, the first step (compiles included) and throughputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny_grpo_config():
    spec = importlib.util.spec_from_file_location("grpo_tiny", os.path.join(ROOT, "configs", "grpo_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("")
    with config.unlocked():
        del config["demo"]
        config.job = "grpo"
        config.tokenizer_dir = "synthetic_arith"
        config.schedule.max_response_len = (config.schedule.max_response_len[0],)
        config.schedule.temperature = (config.schedule.temperature[0],)
        config.schedule.steps = (1000,)
        config.schedule.datasets = ("synthetic_arith:train:4000",)
        config.eval.dataset = ""
        config.export.hf = False
        config.plots = False
        config.checkpoint.every = 10_000
    return config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    import jax

    from polaris_jax.train.grpo import loop as grpo_loop
    from polaris_jax.train.grpo.config import validate_config

    config = tiny_grpo_config()
    validate_config(config)
    with tempfile.TemporaryDirectory() as workdir:
        run = grpo_loop.Run(config, workdir)
        try:
            started = time.perf_counter()
            grpo_loop.train_step(run, 0)
            first_step_s = time.perf_counter() - started
            for step in range(1, args.warmup):
                grpo_loop.train_step(run, step)
            timed = [grpo_loop.train_step(run, step) for step in range(args.warmup, args.warmup + args.steps)]
        finally:
            run.close()

    def median(key):
        return statistics.median(m[key] for m in timed)

    rows = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
    out = {
        "benchmark": "grpo_step",
        "machine": f"{platform.machine()} x{os.cpu_count()} ({jax.devices()[0].platform})",
        "jax": jax.__version__,
        "shape": {
            "hidden": 128,
            "layers": 2,
            "rows": rows,
            "response_len": config.schedule.max_response_len[0],
            "prompts": config.rollout.prompts_per_step,
            "samples": config.rollout.samples_per_prompt,
        },
        "steps_timed": args.steps,
        "step_s": median("time_step"),
        "rollout_s": median("time_rollout"),
        "reward_s": median("time_reward"),
        "update_s": median("time_update"),
        "other_s": median("time_step") - median("time_rollout") - median("time_reward") - median("time_update"),
        "response_len_mean": median("response_len_mean"),
        "rollout_tokens_per_s": median("rollout_tokens_per_s"),
        "train_tokens_per_s": median("train_tokens_per_s"),
        "first_step_s_incl_compile": first_step_s,
        "load_average_1m": os.getloadavg()[0],
    }
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
