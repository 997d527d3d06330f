"""The CPU end-to-end demo (`job='demo'`, configs/grpo_tiny.py): task -> SFT -> GRPO -> held-out pass@1.

Steps, each through the library's real entry points:
  1. write the synthetic arithmetic task into WORKDIR/data: its tokenizer (tokenizer.json +
     tokenizer_config.json), an SFT jsonl of imperfect traces, and disjoint RL and held-out problem
     files (`{"id", "problem", "answer"}` jsonl, the format every RL dataset is read in);
  2. SFT warm start with `sft_loop.run` into WORKDIR/sft, exported as a Hugging Face checkpoint
     (weights + tokenizer);
  3. GRPO with `grpo_loop.run` into WORKDIR/grpo, starting from that export, rewarded by the math
     verifier, which also scores held-out pass@1 before and after.
Returns accuracy_before / accuracy_after (held-out pass@1), the gain and the wall time of each part.
"""

from __future__ import annotations

import os
import time

import ml_collections

from polaris_jax.data import synthetic_arith
from polaris_jax.files import jsonl, write_atomic
from polaris_jax.tools import plots
from polaris_jax.train.grpo import loop as grpo_loop
from polaris_jax.train.grpo.config import validate_config
from polaris_jax.train.sft import loop as sft_loop
from polaris_jax.train.sft.config import default_config as sft_default_config


def write_task(config, data_dir: str) -> dict[str, str]:
    """Tokenizer + sft/rl/eval files (idempotent); returns their paths."""
    d = config.demo
    os.makedirs(data_dir, exist_ok=True)
    paths = {name: os.path.join(data_dir, f"{name}.jsonl") for name in ("sft", "rl", "eval")}
    paths["tokenizer"] = os.path.join(data_dir, "tokenizer")
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    synthetic_arith.build_tokenizer(paths["tokenizer"])
    task = synthetic_arith.ArithTask(min_operands=d.min_operands, max_operands=d.max_operands)
    held_out = synthetic_arith.sample_problems(config.seed + 1, d.eval_problems, task)
    rl_problems = synthetic_arith.sample_problems(
        config.seed + 2, d.rl_problems, task, exclude=[p.text for p in held_out]
    )
    # SFT problems may repeat among themselves but never meet an RL or held-out problem.
    unseen = {p.text for p in held_out} | {p.text for p in rl_problems}
    rng_seed = config.seed + 3
    sft_problems = _sample_allowing_repeats(rng_seed, d.sft_examples, task, unseen)
    traces = synthetic_arith.sft_traces(sft_problems, dict(d.trace_mix.to_dict()), rng_seed, task)
    write_atomic(paths["sft"], jsonl({"prompt": p.text, "response": text} for p, _, text in traces))
    for name, problems in (("rl", rl_problems), ("eval", held_out)):
        write_atomic(
            paths[name],
            jsonl(
                {"id": f"{name}-{i}", **record}
                for i, record in enumerate(synthetic_arith.problems_as_records(problems))
            ),
        )
    return paths


def _sample_allowing_repeats(seed: int, count: int, task, excluded: set[str]):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        problem = synthetic_arith.sample_problem(rng, task)
        if problem.text not in excluded:
            out.append(problem)
    return out


def sft_config(config, paths: dict[str, str]) -> ml_collections.ConfigDict:
    d = config.demo
    c = sft_default_config()
    c.seed = config.seed
    c.model.preset = config.model.preset
    c.model.overrides = ml_collections.ConfigDict(config.model.overrides.to_dict())
    c.model.param_dtype, c.model.compute_dtype = config.model.param_dtype, config.model.compute_dtype
    c.model.remat_policy = config.model.remat_policy
    c.tokenizer_dir = paths["tokenizer"]
    c.data.sources = (paths["sft"],)
    c.data.batch_size = d.sft_batch_size
    c.data.seq_len = d.sft_seq_len
    c.data.num_epochs = 0
    c.data.seed = config.seed
    c.optimizer.peak_lr = d.sft_lr
    c.optimizer.warmup_ratio = 0.05
    c.optimizer.min_lr_ratio = 0.1
    c.train.steps = d.sft_steps
    c.train.loss_chunk_size = config.train.loss_chunk_size
    c.train.log_every = max(d.sft_steps // 10, 1)
    c.checkpoint.every = d.sft_steps
    c.checkpoint.keep = 1
    c.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
    c.sharding_rules = config.sharding_rules
    return c.lock()


def grpo_config(config, paths: dict[str, str], init_from: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    del c["demo"]
    c.job = "grpo"
    c.model.init_from = init_from
    c.model.overrides = ml_collections.ConfigDict()
    c.tokenizer_dir = init_from
    c.schedule.datasets = tuple(paths["rl"] for _ in config.schedule.datasets)
    c.eval.dataset = paths["eval"]
    return c.lock()


def run(config, workdir: str) -> dict:
    started, cpu_started = time.perf_counter(), time.process_time()
    validate_config(config, check_files=False)
    os.makedirs(workdir, exist_ok=True)
    paths = write_task(config, os.path.join(workdir, "data"))
    task_s = time.perf_counter() - started

    t0 = time.perf_counter()
    sft_result = sft_loop.run(sft_config(config, paths), os.path.join(workdir, "sft"))
    sft_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    grpo_result = grpo_loop.run(grpo_config(config, paths, sft_result["export_dir"]), os.path.join(workdir, "grpo"))
    grpo_s = time.perf_counter() - t0
    before, after = grpo_result["accuracy_before"], grpo_result["accuracy_after"]
    return {
        "accuracy_before": before,
        "accuracy_after": after,
        "improvement": after - before,
        "eval_problems": config.demo.eval_problems,
        "eval_samples_per_problem": config.eval.samples_per_problem,
        "sft_final_loss": sft_result.get("loss"),
        "grpo_steps": grpo_result["step"],
        "grpo_final_reward_mean": grpo_result.get("reward_mean"),
        "task_s": task_s,
        "sft_s": sft_s,
        "grpo_s": grpo_s,
        "total_s": time.perf_counter() - started,
        "main_process_cpu_s": time.process_time() - cpu_started,
        "curves_png": plots.plot_training_curves(os.path.join(workdir, "grpo")) if config.plots else None,
        "export_dir": grpo_result.get("export_dir"),
    }
