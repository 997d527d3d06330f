"""Evaluate a checkpoint on a math benchmark: sample n completions per problem, verify them
with the same path and think policy the trainer uses (`rollout.sample_and_verify`,
`rewards.extraction.resolve_think_policy`), and write per-sample jsonl plus a summary JSON.

Problems are processed in chunks of `problems_per_batch`; each chunk's completions go to the
verifier pool asynchronously while the next chunk samples, so verification overlaps generation.

Outputs under `{workdir}/eval/{benchmark name}/`:
    samples.jsonl   one record per sample (problem id, sample index, gold, extracted answer,
                    reward and reason, tokens, finish reason, answer group, completion);
    summary.json    the config used and the metrics (avg@n, pass@k, cons@n, mean response
                    tokens, truncation rate).
Both are written atomically (`files.write_atomic`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from polaris_jax.data.benchmarks import R1_MATH_INSTRUCTION, build_math_prompt, load_benchmark
from polaris_jax.data.problems import Problem
from polaris_jax.evals import metrics as metrics_lib
from polaris_jax.files import jsonl, write_atomic
from polaris_jax.rewards import VerifierPool, scoring
from polaris_jax.rewards.extraction import resolve_think_policy
from polaris_jax.rollout import RolloutSettings, prompt_width, sample_and_verify, verifier_pool
from polaris_jax.sampling.engine_settings import check_sampler_config


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def load_model(config, mesh=None, rules=None):
    """(model_config, params, tokenizer) for `config.checkpoint`, or a random tiny model with
    the offline Qwen tokenizer when `config.checkpoint == "tiny"` (CPU smoke runs). With a mesh,
    the params are placed in their shards (`models.sharding.param_shardings`)."""
    import jax

    from polaris_jax.data.tokenizer import Tokenizer, qwen_tokenizer_offline
    from polaris_jax.models import ModelConfig, init_params, load_hf, param_shardings

    if config.checkpoint == "tiny":
        tokenizer = qwen_tokenizer_offline(config.tokenizer or "qwen3")
        model_config = ModelConfig.tiny(vocab_size=tokenizer.vocab_size)
        params = init_params(model_config, jax.random.key(config.seed))
        if mesh is not None:
            params = jax.device_put(params, param_shardings(model_config, mesh, rules))
        return model_config, params, tokenizer
    if not config.checkpoint:
        raise ValueError("config.checkpoint is empty: name a Hugging Face checkpoint directory or 'tiny'")
    model_config, params = load_hf(config.checkpoint, dtype=config.dtype or None, mesh=mesh, rules=rules)
    return model_config, params, Tokenizer.from_dir(config.tokenizer or config.checkpoint)


def mesh_and_rules(config):
    """The config's device mesh and logical-axis rules; no mesh (one device) for a config without one."""
    from polaris_jax.models.sharding import DEFAULT_RULES

    if "mesh" not in config:
        return None, DEFAULT_RULES
    from polaris_jax.models.sharding import mesh_from_config, sharding_rules

    return mesh_from_config(config), sharding_rules(config)


def think_policy(config, tokenizer) -> str:
    """`config.verifier.think_policy` resolved for this checkpoint's prompt (see
    `rewards.extraction.resolve_think_policy`: "auto" is "require" when the prompt opens the think block)."""
    return resolve_think_policy(config.verifier.think_policy, _prompt_text(config, "1+1", tokenizer))


def _prompt_text(config, problem: str, tokenizer) -> str:
    instruction = config.get("instruction", R1_MATH_INSTRUCTION)
    return build_math_prompt(problem, tokenizer, force_think=config.force_think, instruction=instruction)


def _problems(config, rows, tokenizer) -> list[Problem]:
    texts = [_prompt_text(config, row["problem"], tokenizer) for row in rows]
    return [Problem(row["id"], tuple(ids), row["answer"]) for row, ids in zip(rows, tokenizer.encode_batch(texts))]


def _equivalent_pairs(pool: VerifierPool):
    def check(pairs: list[tuple[str, str]]) -> list[bool]:
        return pool.map_async(scoring.equivalent, pairs, on_failure=lambda reason: False).result()

    return check


def run_eval(config, workdir: str) -> dict[str, Any]:
    """Sample, verify and score `config.benchmark`; returns the summary metrics."""
    started = time.time()
    if "backend" in config:
        check_sampler_config(config.backend, config.engine)
    problems = load_benchmark(config.benchmark)
    if config.num_problems:
        problems = problems[: config.num_problems]
    mesh, rules = mesh_and_rules(config)
    model_config, params, tokenizer = load_model(config, mesh, rules)
    n = int(config.n)
    problem_list = _problems(config, problems, tokenizer)
    chunks = -(-len(problem_list) // max(1, int(config.problems_per_batch)))
    settings = RolloutSettings(
        max_response_len=int(config.max_new_tokens),
        temperature=config.temperature,
        samples_per_prompt=n,
        prompt_width=prompt_width(problem_list),
        top_p=config.top_p,
        top_k=config.top_k,
        chunks=chunks,
        backend=config.get("backend", "static"),
        engine=config.engine.to_dict() if "engine" in config else None,
    )
    with verifier_pool(
        config.verifier.think_policy,
        _prompt_text(config, "1+1", tokenizer),
        num_workers=config.verifier_workers or None,
        timeout_s=config.verifier_timeout_s,
    ) as pool:
        verified = sample_and_verify(
            model_config,
            params,
            problem_list,
            settings,
            tokenizer=tokenizer,
            pool=pool,
            seed=int(config.seed),
            mesh=mesh,
            rules=rules,
        )
        rollouts = verified.rollouts
        records = [
            {
                "id": problems[row // n]["id"],
                "sample": row % n,
                "gold": problems[row // n]["answer"],
                "answer": score.answer,
                "reward": score.reward,
                "reason": score.reason,
                "num_tokens": int(rollouts.response_len_b[row]),
                "finish_reason": reason,
                "completion": text,
            }
            for row, (score, text, reason) in enumerate(zip(verified.scores, verified.texts, rollouts.finish_reasons))
        ]
        answers_gn = [[r["answer"] for r in records[i : i + n]] for i in range(0, len(records), n)]
        labels_gn = metrics_lib.group_answers(answers_gn, _equivalent_pairs(pool))
        verifier_failures, think = dict(pool.failures), pool.extraction.think
    for i, record in enumerate(records):
        record["group"] = labels_gn[i // n][i % n]

    shape = (len(problems), n)
    correct_gn = np.asarray([r["reward"] for r in records]).reshape(shape)
    num_tokens_gn = np.asarray([r["num_tokens"] for r in records]).reshape(shape)
    truncated_gn = np.asarray([r["finish_reason"] == "length" for r in records]).reshape(shape)
    metrics = metrics_lib.summarize(correct_gn, labels_gn, num_tokens_gn, truncated_gn)

    out_dir = Path(workdir) / "eval" / Path(str(config.benchmark).rstrip("/")).stem
    summary = {
        "benchmark": str(config.benchmark),
        "checkpoint": str(config.checkpoint),
        "num_problems": len(problems),
        "n": n,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        "force_think": config.force_think,
        "think_policy": think,
        "metrics": metrics,
        "verifier_failures": verifier_failures,
        "wall_s": time.time() - started,
    }
    if _is_writer():  # multi-host: every process holds every sample; one writes
        write_atomic(out_dir / "samples.jsonl", jsonl(records))
        write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return {
        **metrics,
        "num_problems": len(problems),
        "samples_path": str(out_dir / "samples.jsonl"),
        "summary_path": str(out_dir / "summary.json"),
    }
