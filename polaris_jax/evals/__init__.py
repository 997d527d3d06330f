"""Benchmark evaluation: avg@n, unbiased pass@k and equivalence-grouped cons@n.

`run_eval(config, workdir)` is the `job='eval'` entry point of `polaris_jax.main`.
"""

from polaris_jax.evals.metrics import (
    avg_at_n,
    cons_at_n,
    default_ks,
    group_answers,
    majority_index,
    mean_pass_at_k,
    pass_at_k,
    summarize,
)


def run_eval(config, workdir: str) -> dict:
    """Sample, verify and score config.benchmark; see polaris_jax.evals.harness."""
    from polaris_jax.evals.harness import run_eval as _run_eval  # keeps `import evals` free of JAX

    return _run_eval(config, workdir)


__all__ = [
    "avg_at_n",
    "cons_at_n",
    "default_ks",
    "group_answers",
    "majority_index",
    "mean_pass_at_k",
    "pass_at_k",
    "run_eval",
    "summarize",
]
