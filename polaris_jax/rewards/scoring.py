"""Scoring one completion against one gold answer: extraction, then equivalence.

`score_completion` is the in-process function the pool's workers run (`pool.math_reward` sends it
there, so that even a completion that makes sympy spin returns within the pool's timeout).
"""

from __future__ import annotations

from typing import NamedTuple

from polaris_jax.rewards.equivalence import answers_equivalent
from polaris_jax.rewards.extraction import ExtractionConfig, extract_answer


class Score(NamedTuple):
    """A verifier verdict: the reward (1.0 or 0.0), why, and the answer that was judged."""

    reward: float
    reason: str
    answer: str | None = None


def score_completion(completion: str, gold: str, extraction: ExtractionConfig = ExtractionConfig()) -> Score:
    """1.0 when the final answer of `completion` is mathematically `gold`, else 0.0."""
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str (normalise it when loading), got {type(gold).__name__}")
    if not gold.strip():
        raise ValueError("gold answer is empty")
    found = extract_answer(completion, extraction)
    if found.answer is None:
        return Score(0.0, found.source)
    verdict = answers_equivalent(gold, found.answer)
    return Score(1.0 if verdict.equal else 0.0, f"{found.source}: {verdict.reason}", found.answer)


def equivalent(first: str, second: str) -> bool:
    """Plain-bool equivalence of two extracted answers, for running in a pool (cons@n)."""
    return answers_equivalent(first, second).equal
