"""Benchmark evaluation: avg@n, unbiased pass@k and equivalence-grouped cons@n.

`run_eval(config, workdir)` is the `job='eval'` entry point of `polaris_jax.main`. Names resolve lazily
(`polaris_jax.lazy`): `import polaris_jax.evals` stays free of JAX, and the metrics never pull in the
harness.
"""

from polaris_jax import lazy

_METRICS = (
    "avg_at_n",
    "cons_at_n",
    "default_ks",
    "group_answers",
    "majority_index",
    "mean_pass_at_k",
    "pass_at_k",
    "summarize",
)

__getattr__, __dir__, __all__ = lazy.attach(
    __name__,
    exports={
        **{name: "polaris_jax.evals.metrics" for name in _METRICS},
        "run_eval": "polaris_jax.evals.harness",
    },
)
