"""Benchmark metrics over n scored samples per problem.

avg@n   mean over problems of the fraction of correct samples (the pass@1 estimate);
pass@k  the unbiased estimator of Chen et al. 2021, 1 - C(n-c, k) / C(n, k), averaged;
cons@n  majority vote: the most common final answer, answers grouped by mathematical
        equivalence (so "1/2" and "0.5" vote together), scored by the verifier;
plus mean response length in tokens and the fraction of samples cut off at the token limit.
avg@n and pass@k live in `rewards.estimators` (the in-loop evaluation uses them too) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from polaris_jax.rewards.equivalence import string_key
from polaris_jax.rewards.estimators import avg_at_n, mean_pass_at_k, pass_at_k  # noqa: F401 (re-exported)


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def group_answers(
    answers_gn: Sequence[Sequence[str | None]],
    equivalent_pairs: Callable[[list[tuple[str, str]]], list[bool]],
) -> list[list[int | None]]:
    """Per problem, a group label per answer (None: no answer); equal labels = equivalent.

    Answers that agree as normalised strings share a group at once; the remaining distinct
    representatives are compared pairwise with `equivalent_pairs`, called once for all
    problems (so it can fan out over a VerifierPool), and groups merge transitively.
    """
    first_labels, representatives, pairs = [], [], []
    for answers in answers_gn:
        keys: dict[str, int] = {}
        reps: list[str] = []
        labels: list[int | None] = []
        for answer in answers:
            if answer is None:
                labels.append(None)
                continue
            key = string_key(answer)
            if key not in keys:
                keys[key] = len(reps)
                reps.append(answer)
            labels.append(keys[key])
        first_labels.append(labels)
        representatives.append(reps)
        pairs.append([(i, j) for i in range(len(reps)) for j in range(i + 1, len(reps))])
    flat = [(reps[i], reps[j]) for reps, problem_pairs in zip(representatives, pairs) for i, j in problem_pairs]
    verdicts = iter(equivalent_pairs(flat) if flat else [])
    grouped = []
    for labels, reps, problem_pairs in zip(first_labels, representatives, pairs):
        parent = list(range(len(reps)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, j in problem_pairs:
            if next(verdicts):
                parent[root(j)] = root(i)
        grouped.append([None if label is None else root(label) for label in labels])
    return grouped


def majority_index(labels: Sequence[int | None]) -> int | None:
    """Index of a sample from the largest answer group (ties: the group seen first)."""
    counts: dict[int, int] = {}
    first_index: dict[int, int] = {}
    for index, label in enumerate(labels):
        if label is None:
            continue
        counts[label] = counts.get(label, 0) + 1
        first_index.setdefault(label, index)
    if not counts:
        return None
    best = max(counts, key=lambda label: (counts[label], -first_index[label]))
    return first_index[best]


def cons_at_n(correct_gn: np.ndarray, labels_gn: Sequence[Sequence[int | None]]) -> float:
    """Fraction of problems whose majority answer group is correct (no answer: wrong)."""
    correct_gn = np.asarray(correct_gn)
    hits = []
    for correct_n, labels in zip(correct_gn, labels_gn):
        winner = majority_index(labels)
        hits.append(0.0 if winner is None else float(correct_n[winner]))
    return float(np.mean(hits))


def summarize(
    correct_gn: np.ndarray,
    labels_gn: Sequence[Sequence[int | None]],
    num_tokens_gn: np.ndarray,
    truncated_gn: np.ndarray,
    ks: Sequence[int] | None = None,
) -> dict[str, float]:
    """All benchmark metrics as a flat dict of floats."""
    correct_gn = np.asarray(correct_gn, np.float64)
    n = correct_gn.shape[1]
    metrics = {f"avg@{n}": avg_at_n(correct_gn)}
    for k in ks or default_ks(n):
        metrics[f"pass@{k}"] = mean_pass_at_k(correct_gn, k)
    metrics[f"cons@{n}"] = cons_at_n(correct_gn, labels_gn)
    metrics["mean_response_tokens"] = float(np.mean(num_tokens_gn))
    metrics["truncation_rate"] = float(np.mean(truncated_gn))
    return metrics
