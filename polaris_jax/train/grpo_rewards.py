"""Rewards of a rollout batch: verifier verdicts from the pool, then the config's weighted reward spec.

A reward function that raises does not stop training: the error is logged with its traceback, the
function is retried one sample at a time, and every sample on which it still raises scores 0 for
that reward. The verifier pool already turns a hung or crashing verification into a 0 score.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from polaris_jax.rewards import RewardBatch, get_reward

logger = logging.getLogger(__name__)


def _entries(spec) -> list[tuple[str, float, dict[str, Any]]]:
    spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    out = []
    for name, entry in spec.items():
        entry = dict(entry)
        weight = float(entry.pop("weight"))
        out.append((name, weight, entry))
    return out


def _one_reward(name: str, fn, batch: RewardBatch, params: dict) -> tuple[np.ndarray, int]:
    """(reward_b, number of samples that raised)."""
    try:
        reward_b = np.asarray(fn(batch, **params), np.float32)
        if reward_b.shape != (batch.size,):
            raise ValueError(f"returned shape {reward_b.shape}, expected ({batch.size},)")
        return reward_b, 0
    except Exception:  # noqa: BLE001 - any user reward bug must not kill a multi-day run
        logger.exception("reward %r raised on a batch of %d; retrying sample by sample", name, batch.size)
    reward_b = np.zeros(batch.size, np.float32)
    failed = 0
    for i in range(batch.size):
        one = RewardBatch(completions=[batch.completions[i]], num_tokens_b=batch.num_tokens_b[i:i + 1],
                          correct_b=batch.correct_b[i:i + 1], group_ids_b=batch.group_ids_b[i:i + 1])
        try:
            value = np.asarray(fn(one, **params), np.float32).reshape(-1)
            if value.shape != (1,) or not np.isfinite(value[0]):
                raise ValueError(f"returned {value!r} for one sample")
            reward_b[i] = value[0]
        except Exception as error:  # noqa: BLE001
            failed += 1
            logger.warning("reward %r raised on sample %d (scored 0): %r", name, i, error)
    return reward_b, failed


def shape_rewards(spec: Mapping, completions: Sequence[str], num_tokens_b, correct_b,
                  group_ids_b) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """(total_b, {name: reward_b}, samples on which some reward raised)."""
    batch = RewardBatch(completions=list(completions), num_tokens_b=np.asarray(num_tokens_b),
                        correct_b=np.asarray(correct_b, np.float32), group_ids_b=np.asarray(group_ids_b))
    total_b = np.zeros(batch.size, np.float32)
    parts, failures = {}, 0
    for name, weight, params in _entries(spec):
        reward_b, failed = _one_reward(name, get_reward(name), batch, params)
        reward_b = np.where(np.isfinite(reward_b), reward_b, 0.0).astype(np.float32)
        parts[name] = reward_b
        total_b += np.float32(weight) * reward_b
        failures += failed
    return total_b, parts, failures


def verify_async(pool, completions: Sequence[str], golds: Sequence[str]) -> concurrent.futures.Future:
    """Future of one verifier `Score` per completion (pool failures already score 0)."""
    return pool.score_async(list(completions), list(golds))
