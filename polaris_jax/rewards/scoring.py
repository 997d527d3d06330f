"""Scoring one completion against one gold answer: extraction, then equivalence.

`score_completion` is the in-process function the pool's workers run. `math_reward` is the
public contract: it sends the work to a shared VerifierPool so that even a completion that
makes sympy spin returns within the pool's timeout.
"""

from __future__ import annotations

import atexit
import threading
from typing import NamedTuple

from polaris_jax.rewards.equivalence import answers_equivalent
from polaris_jax.rewards.extraction import ExtractionConfig, extract_answer


class Score(NamedTuple):
    """A verifier verdict: the reward (1.0 or 0.0), why, and the answer that was judged."""

    reward: float
    reason: str
    answer: str | None = None


def score_completion(
    completion: str, gold: str, extraction: ExtractionConfig = ExtractionConfig()
) -> Score:
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


_default_pool = None
_default_pool_lock = threading.Lock()


def default_pool():
    """The process-wide VerifierPool behind `math_reward`, started on first use."""
    global _default_pool
    from polaris_jax.rewards.pool import VerifierPool  # pool imports this module

    with _default_pool_lock:
        if _default_pool is None or _default_pool.closed:
            _default_pool = VerifierPool()
            atexit.register(_default_pool.close)
        return _default_pool


def math_reward(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer (last box, after `</think>`) equals `gold`, else 0.0.

    Runs in the shared verifier pool: a worker that hangs or crashes is replaced and the
    item scores 0.0, so this always returns within the pool's per-item timeout.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}")
    return default_pool().score([completion], [gold])[0].reward
