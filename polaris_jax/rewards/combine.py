"""Weighted sums of registered rewards, as named by the config.

A reward spec maps reward names to their weight and parameters, e.g. in a config:

    config.rewards = dict(
        accuracy=dict(weight=1.0),
        soft_overlong=dict(weight=1.0, max_tokens=4096, cache_tokens=512),
    )

`combine_rewards` evaluates each named reward on a RewardBatch and returns the weighted
total with every component, so the trainer can log them. A reward that raises does not stop
training: it is retried sample by sample and scores 0 where it still raises (counted, logged).
`rollout.sample_and_verify` is the one caller on the training and evaluation paths.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from polaris_jax.rewards import shaped  # noqa: F401  (registers the shaped rewards)
from polaris_jax.rewards.registry import get_reward
from polaris_jax.rewards.shaped import RewardBatch

logger = logging.getLogger(__name__)


def _as_dict(spec: Any) -> dict:
    return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)


def validate_spec(spec: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise a ValueError naming the problem if `spec` is not a valid reward spec."""
    spec = _as_dict(spec)
    if not spec:
        raise ValueError("reward spec is empty; name at least one reward, e.g. accuracy")
    for name, entry in spec.items():
        fn = get_reward(name)  # KeyError lists the available names
        entry = _as_dict(entry)
        if "weight" not in entry:
            raise ValueError(f"reward {name!r} has no weight")
        params = {k: v for k, v in entry.items() if k != "weight"}
        try:
            inspect.signature(fn).bind(None, **params)
        except TypeError as error:
            raise ValueError(f"reward {name!r}: bad parameters {sorted(params)}: {error}") from None


def _one_reward(name: str, fn, batch: RewardBatch, params: dict) -> tuple[np.ndarray, int]:
    """(reward_b, samples on which it raised). A reward that raises on the batch is retried one sample at a
    time, and a sample on which it still raises (or gives a non-finite value) scores 0: a user's reward bug
    must not end a multi-day run. The error is logged with its traceback."""
    try:
        reward_b = np.asarray(fn(batch, **params), np.float32)
        if reward_b.shape != (batch.size,):
            raise ValueError(f"returned shape {reward_b.shape}, expected ({batch.size},)")
        return np.where(np.isfinite(reward_b), reward_b, 0.0).astype(np.float32), 0
    except Exception:  # noqa: BLE001
        logger.exception("reward %r raised on a batch of %d; retrying sample by sample", name, batch.size)
    reward_b = np.zeros(batch.size, np.float32)
    failed = 0
    for i in range(batch.size):
        one = RewardBatch(
            completions=[batch.completions[i]],
            num_tokens_b=batch.num_tokens_b[i : i + 1],
            correct_b=batch.correct_b[i : i + 1],
            group_ids_b=batch.group_ids_b[i : i + 1],
        )
        try:
            value = np.asarray(fn(one, **params), np.float32).reshape(-1)
            if value.shape != (1,) or not np.isfinite(value[0]):
                raise ValueError(f"returned {value!r} for one sample")
            reward_b[i] = value[0]
        except Exception as error:  # noqa: BLE001
            failed += 1
            logger.warning("reward %r raised on sample %d (scored 0): %r", name, i, error)
    return reward_b, failed


def combine_rewards(
    batch: RewardBatch, spec: Mapping[str, Mapping[str, Any]]
) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """(total_b, {name: reward_b}, failures) with total_b = sum over names of weight * reward_b, where
    failures counts the samples on which some reward raised (they score 0 for that reward)."""
    validate_spec(spec)
    total_b = np.zeros(batch.size, np.float32)
    parts: dict[str, np.ndarray] = {}
    failures = 0
    for name, entry in _as_dict(spec).items():
        entry = _as_dict(entry)
        params = {k: v for k, v in entry.items() if k != "weight"}
        reward_b, failed = _one_reward(name, get_reward(name), batch, params)
        parts[name] = reward_b
        total_b += np.float32(entry["weight"]) * reward_b
        failures += failed
    return total_b, parts, failures
