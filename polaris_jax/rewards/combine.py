"""Weighted sums of registered rewards, as named by the config.

A reward spec maps reward names to their weight and parameters, e.g. in a config:

    config.rewards = dict(
        accuracy=dict(weight=1.0),
        soft_overlong=dict(weight=1.0, max_tokens=4096, cache_tokens=512),
    )

`combine_rewards` evaluates each named reward on a RewardBatch and returns the weighted
total with every component, so the trainer can log them. `score_and_shape_async` runs the
verifier pool first and resolves to the same, so reward work overlaps the next rollout.
"""

from __future__ import annotations

import concurrent.futures
import inspect
from typing import Any, Mapping, Sequence

import numpy as np

from polaris_jax.rewards import shaped  # noqa: F401  (registers the shaped rewards)
from polaris_jax.rewards.registry import get_reward
from polaris_jax.rewards.shaped import RewardBatch

_SHAPER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-shaping")


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


def combine_rewards(
    batch: RewardBatch, spec: Mapping[str, Mapping[str, Any]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total_b, {name: reward_b}) with total_b = sum over names of weight * reward_b."""
    validate_spec(spec)
    total_b = np.zeros(batch.size, np.float32)
    parts: dict[str, np.ndarray] = {}
    for name, entry in _as_dict(spec).items():
        entry = _as_dict(entry)
        params = {k: v for k, v in entry.items() if k != "weight"}
        reward_b = np.asarray(get_reward(name)(batch, **params), np.float32)
        if reward_b.shape != (batch.size,):
            raise ValueError(f"reward {name!r} returned shape {reward_b.shape}, expected ({batch.size},)")
        parts[name] = reward_b
        total_b += np.float32(entry["weight"]) * reward_b
    return total_b, parts


def score_and_shape_async(
    pool,
    completions: Sequence[str],
    golds: Sequence[str],
    num_tokens_b: np.ndarray,
    group_ids_b: np.ndarray,
    spec: Mapping[str, Mapping[str, Any]],
) -> concurrent.futures.Future:
    """Future of (total_b, parts, scores): verify in `pool`, then combine per `spec`."""
    validate_spec(spec)
    result: concurrent.futures.Future = concurrent.futures.Future()
    result.set_running_or_notify_cancel()

    def shape(scores_future: concurrent.futures.Future) -> None:
        try:
            scores = scores_future.result()
            batch = RewardBatch(
                completions=list(completions),
                num_tokens_b=np.asarray(num_tokens_b),
                correct_b=np.asarray([s.reward for s in scores], np.float32),
                group_ids_b=np.asarray(group_ids_b),
            )
            total_b, parts = combine_rewards(batch, spec)
            result.set_result((total_b, parts, scores))
        except BaseException as error:
            result.set_exception(error)

    # Shape on our own thread: done-callbacks run on the pool's dispatcher thread, which must
    # stay free to enforce timeouts.
    pool.score_async(completions, golds).add_done_callback(lambda done: _SHAPER.submit(shape, done))
    return result
