"""Name -> function tables for the pluggable pieces of the RL objective.

A config selects an advantage estimator, a policy loss, a loss aggregation and a KL estimator by
name; adding an algorithm means registering one more function, never adding a flag to a trainer.
An entry's own hyperparameters are its keyword arguments: the config passes them by name
(`algo.advantage_kwargs`, `algo.policy_loss_kwargs`) and `validate_config` binds them to the
signature (`Registry.bind`) before anything compiles. What the trainer must know about an entry
is declared where it is registered:

- an advantage estimator, its `min_group_size` (samples per prompt it is defined for);
- a loss aggregation, its `micro_weight(mask_br, total_mask_br) -> scalar`: the share of the
  minibatch's normaliser that a microbatch holds, so weighted microbatch losses sum to the
  minibatch loss (None: the mode cannot be split into microbatches).
"""

from __future__ import annotations

from collections.abc import Callable

from polaris_jax.registry import Registry

# `inputs`: the data arguments every entry takes before its keyword arguments.
ADVANTAGES = Registry("advantage estimator", inputs=1)  # (rewards_gn, **kwargs)
POLICY_LOSSES = Registry("policy loss", inputs=4)  # (logprobs_bt, old_logprobs_bt, advantages, mask_bt, **kwargs)
LOSS_AGGREGATIONS = Registry("loss aggregation mode", inputs=2)  # (loss_bt, mask_bt, *, max_response_len)
KL_ESTIMATORS = Registry("KL estimator", inputs=2)  # (logprobs_bt, ref_logprobs_bt)


def register_advantage(name: str, *, min_group_size: int = 1):
    if min_group_size < 1:
        raise ValueError(f"advantage estimator {name!r}: min_group_size must be >= 1, got {min_group_size}")
    return ADVANTAGES.register(name, min_group_size=min_group_size)


def get_advantage(name: str) -> Callable:
    return ADVANTAGES.get(name)


def min_group_size(name: str) -> int:
    """The fewest samples per prompt the estimator `name` is defined for."""
    return ADVANTAGES.meta(name)["min_group_size"]


def register_policy_loss(name: str):
    return POLICY_LOSSES.register(name)


def get_policy_loss(name: str) -> Callable:
    return POLICY_LOSSES.get(name)


def register_loss_aggregation(name: str, *, micro_weight: Callable | None = None):
    return LOSS_AGGREGATIONS.register(name, micro_weight=micro_weight)


def get_loss_aggregation(name: str) -> Callable:
    return LOSS_AGGREGATIONS.get(name)


def micro_weight(mode: str) -> Callable | None:
    """`fn(mask_br, total_mask_br) -> scalar` of the aggregation `mode`, or None if it has none."""
    return LOSS_AGGREGATIONS.meta(mode)["micro_weight"]


def register_kl_estimator(name: str):
    return KL_ESTIMATORS.register(name)


def get_kl_estimator(name: str) -> Callable:
    return KL_ESTIMATORS.get(name)
