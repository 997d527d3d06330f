"""Held-out evaluation during RL: pass@1 as the mean verifier verdict over n samples per problem.

It runs the same sampler and the same verifier pool as the rollouts (`grpo_rollout.rollout` with
the plain accuracy reward), so the number reported is the number trained on. pass@1 here is avg@n
(the unbiased pass@1 estimate over n samples at the eval temperature, as DeepSeek-R1 and Polaris
report it); pass@n uses the unbiased estimator of Chen et al. 2021.
"""

from __future__ import annotations

import numpy as np

from polaris_jax.evals.metrics import avg_at_n, mean_pass_at_k
from polaris_jax.rollout import RolloutSettings, rollout

_ACCURACY_ONLY = {"accuracy": {"weight": 1.0}}


def prompt_width(problems, multiple: int = 8) -> int:
    return -(-max(len(p.prompt_ids) for p in problems) // multiple) * multiple


def evaluate(model_config, params, problems, *, tokenizer, pool, samples_per_problem: int, temperature: float,
             max_response_len: int, seed: int, mesh=None, rules=None, top_p: float = 1.0,
             chunks: int = 1) -> dict:
    settings = RolloutSettings(max_response_len=max_response_len, temperature=temperature,
                               samples_per_prompt=samples_per_problem, prompt_width=prompt_width(problems),
                               top_p=top_p, chunks=chunks)
    batch, texts, info = rollout(model_config, params, problems, settings, tokenizer=tokenizer, pool=pool,
                                 reward_spec=_ACCURACY_ONLY, seed=seed, mesh=mesh, rules=rules)
    correct_pn = batch["correct_b"].reshape(len(problems), samples_per_problem)
    return {
        "pass@1": avg_at_n(correct_pn),
        f"pass@{samples_per_problem}": mean_pass_at_k(correct_pn, samples_per_problem),
        "response_len_mean": float(np.mean(batch["response_len_b"])),
        "truncation_rate": float(np.mean(batch["truncated_b"])),
        "time_s": info["time_rollout"] + info["time_reward"],
        "example": texts[0],
    }
