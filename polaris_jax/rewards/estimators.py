"""Unbiased estimators of verifier success over n samples per problem, shared by the in-loop evaluation
and the eval job (`evals.metrics` re-exports them).

avg@n   mean over problems of the fraction of correct samples (the pass@1 estimate);
pass@k  the unbiased estimator of Chen et al. 2021, 1 - C(n-c, k) / C(n, k), averaged.
"""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c correct out of n samples (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) so large n
    does not overflow.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"{name} must be an integer, got {value!r}")
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_n(correct_gn: np.ndarray) -> float:
    """Mean correctness over problems (groups g) and their n samples; correct_gn is 0/1 [g, n]."""
    correct_gn = np.asarray(correct_gn, np.float64)
    if correct_gn.ndim != 2 or correct_gn.size == 0:
        raise ValueError(f"correct_gn must be a non-empty [g, n] array, got shape {correct_gn.shape}")
    return float(correct_gn.mean())


def mean_pass_at_k(correct_gn: np.ndarray, k: int) -> float:
    correct_gn = np.asarray(correct_gn)
    n = correct_gn.shape[1]
    return float(np.mean([pass_at_k(n, int(c), k) for c in correct_gn.sum(axis=1)]))
