"""Polaris's difficulty filter (`job='difficulty_filter'`): sample k answers per problem with a
checkpoint, drop the problems it solves k/k (and, optionally, those above an accuracy threshold),
and write the rest as the next stage's dataset.

    python -m polaris_jax.main --config=configs/polaris_qwen3_4b.py:filter --workdir=/ckpt/filter \\
        --config.filter.checkpoint=/ckpt/polaris_qwen3_4b/export/hf

Writes WORKDIR/filtered.jsonl ({"id", "problem", "answer", "pass_rate"}; the output path can be set)
and WORKDIR/solve_counts.jsonl (one line per k: how many problems got k correct answers; the histogram of
correct answers per problem: Polaris's difficulty
distribution, which should look like a mirrored J).
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from polaris_jax.data import problems as problems_lib
from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.files import jsonl, write_atomic
from polaris_jax.models import load_hf
from polaris_jax.models.sharding import DEFAULT_RULES, mesh_from_config, sharding_rules
from polaris_jax.rollout import RolloutSettings, prompt_width, rollout_seed, sample_and_verify, verifier_pool
from polaris_jax.train.grpo.config import default_config


def filter_config(
    *,
    model_dir: str,
    dataset: str,
    samples: int = 8,
    temperature: float = 1.0,
    max_response_len: int = 4096,
    instruction: str = "",
    mesh=None,
) -> ml_collections.ConfigDict:
    """The GRPO schema plus a `filter` section; `--config.filter.*` overrides any of it."""
    c = default_config()
    c.job = "difficulty_filter"
    c.model.init_from = model_dir
    c.data.instruction = instruction
    c.filter = ml_collections.ConfigDict()
    c.filter.checkpoint = model_dir
    c.filter.dataset = dataset
    c.filter.samples = samples  # k
    c.filter.temperature = temperature
    c.filter.max_response_len = max_response_len
    c.filter.max_pass_rate = 1.0  # keep problems solved at most this often; 1.0 drops only k/k
    c.filter.prompts_per_batch = 64
    c.filter.output = ""  # "" = WORKDIR/filtered.jsonl
    if mesh is not None:
        c.mesh = mesh
    return c


def load_policy(checkpoint: str, mesh=None, rules=DEFAULT_RULES, dtype=None):
    """(tokenizer, model config, params placed on the mesh) from a Hugging Face checkpoint directory."""
    model_config, params = load_hf(checkpoint, dtype=dtype, mesh=mesh, rules=rules)
    return Tokenizer.from_dir(checkpoint), model_config, params


def keep_mask(correct_gn: np.ndarray, max_pass_rate: float) -> np.ndarray:
    """[P] bool: not solved k/k, and solved at most `max_pass_rate` of the time."""
    rate_g = correct_gn.mean(axis=1)
    return (rate_g < 1.0) & (rate_g <= max_pass_rate)


def run(config, workdir: str) -> dict:
    f = config.filter
    if f.samples < 1:
        raise ValueError(f"filter.samples={f.samples} must be >= 1")
    if not 0.0 <= f.max_pass_rate <= 1.0:
        raise ValueError(f"filter.max_pass_rate={f.max_pass_rate} must be in [0, 1]")
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    mesh, rules = mesh_from_config(config), sharding_rules(config)
    tokenizer, model_config, params = load_policy(f.checkpoint, mesh, rules)
    rows = problems_lib.load_rows(f.dataset)
    problems = problems_lib.load_problems(f.dataset, tokenizer, config.data, rows=rows)
    by_id = {row["id"]: row for row in rows}
    settings = RolloutSettings(
        max_response_len=f.max_response_len,
        temperature=f.temperature,
        samples_per_prompt=f.samples,
        prompt_width=prompt_width(problems),
        top_p=config.rollout.top_p,
        backend=config.rollout.get("backend", "static"),
        engine=config.rollout.engine.to_dict() if "engine" in config.rollout else None,
    )
    correct = []
    with verifier_pool(
        config.verifier.think_policy,
        problems_lib.prompt_text("1+1", tokenizer, config.data),
        num_workers=config.reward_workers or None,
        timeout_s=config.reward_timeout_s,
    ) as pool:
        for start in range(0, len(problems), f.prompts_per_batch):
            chunk = problems[start : start + f.prompts_per_batch]
            verified = sample_and_verify(
                model_config,
                params,
                chunk,
                settings,
                tokenizer=tokenizer,
                pool=pool,
                seed=rollout_seed(config.seed, start),
                mesh=mesh,
                rules=rules,
            )
            correct.append(verified.rollouts.correct_b.reshape(len(chunk), f.samples))
    correct_gn = np.concatenate(correct)
    keep_g = keep_mask(correct_gn, f.max_pass_rate)
    output = f.output or os.path.join(workdir, "filtered.jsonl")
    if jax.process_index() == 0:
        write_atomic(
            output,
            jsonl(
                {**by_id[p.id], "pass_rate": float(correct_gn[i].mean())} for i, p in enumerate(problems) if keep_g[i]
            ),
        )
        counts = np.bincount(correct_gn.sum(axis=1).astype(int), minlength=f.samples + 1)
        write_atomic(
            os.path.join(workdir, "solve_counts.jsonl"),
            jsonl({"correct": c, "problems": int(n)} for c, n in enumerate(counts)),
        )
    solved_all = int((correct_gn.mean(axis=1) == 1.0).sum())
    return {
        "problems": len(problems),
        "kept": int(keep_g.sum()),
        "dropped_solved_all": solved_all,
        "dropped_above_threshold": int(len(problems) - keep_g.sum() - solved_all),
        "mean_pass_rate": float(correct_gn.mean()),
        "output": output,
        "time_s": time.perf_counter() - started,
    }
