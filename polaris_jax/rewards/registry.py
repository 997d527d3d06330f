"""The reward table: every shaped reward is registered here under a name the config uses.

A reward function takes a `RewardBatch` and keyword parameters from the config and returns
a float32 array with one value per completion.
"""

from __future__ import annotations

from collections.abc import Callable

from polaris_jax.registry import Registry

REWARDS = Registry("reward")


def register_reward(name: str):
    return REWARDS.register(name)


def get_reward(name: str) -> Callable:
    return REWARDS.get(name)


def reward_names() -> list[str]:
    return REWARDS.names()
