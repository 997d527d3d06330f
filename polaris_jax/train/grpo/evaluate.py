"""Held-out evaluation during RL: pass@1 as the mean verifier verdict over n samples per problem.

It is `rollout.sample_and_verify` with the plain accuracy reward and the run's verifier pool (so the
same think policy), the path the rollouts and the eval job take, so the number reported is the number
trained on. pass@1 here is avg@n (the unbiased pass@1 estimate over n samples at the eval temperature,
as DeepSeek-R1 and Polaris report it); pass@n uses the unbiased estimator of Chen et al. 2021.
"""

from __future__ import annotations

import numpy as np

from polaris_jax.rewards.estimators import avg_at_n, mean_pass_at_k
from polaris_jax.rollout import RolloutSettings, prompt_width, sample_and_verify


def evaluate(
    model_config,
    params,
    problems,
    *,
    tokenizer,
    pool,
    samples_per_problem: int,
    temperature: float,
    max_response_len: int,
    seed: int,
    mesh=None,
    rules=None,
    top_p: float = 1.0,
    chunks: int = 1,
    backend: str = "static",
    engine=None,
) -> dict:
    settings = RolloutSettings(
        max_response_len=max_response_len,
        temperature=temperature,
        samples_per_prompt=samples_per_problem,
        prompt_width=prompt_width(problems),
        top_p=top_p,
        chunks=chunks,
        backend=backend,
        engine=engine,
    )
    verified = sample_and_verify(
        model_config, params, problems, settings, tokenizer=tokenizer, pool=pool, seed=seed, mesh=mesh, rules=rules
    )
    rollouts = verified.rollouts
    correct_gn = rollouts.correct_b.reshape(len(problems), samples_per_problem)
    return {
        "pass@1": avg_at_n(correct_gn),
        f"pass@{samples_per_problem}": mean_pass_at_k(correct_gn, samples_per_problem),
        "response_len_mean": float(np.mean(rollouts.response_len_b)),
        "truncation_rate": float(np.mean(rollouts.truncated_b)),
        "time_s": verified.info["time_rollout"] + verified.info["time_reward"],
        "example": verified.texts[0],
    }
