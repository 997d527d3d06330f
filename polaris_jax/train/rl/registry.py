"""Name -> function tables for the pluggable pieces of the RL objective.

A config selects an advantage estimator, a policy loss, a loss aggregation and a KL
estimator by name; adding an algorithm means registering one more function here, never
adding a flag to a trainer.
"""

from __future__ import annotations

from typing import Callable

from polaris_jax.registry import Registry


ADVANTAGES = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
LOSS_AGGREGATIONS = Registry("loss aggregation mode")
KL_ESTIMATORS = Registry("KL estimator")


def register_advantage(name: str):
    return ADVANTAGES.register(name)


def get_advantage(name: str) -> Callable:
    return ADVANTAGES.get(name)


def register_policy_loss(name: str):
    return POLICY_LOSSES.register(name)


def get_policy_loss(name: str) -> Callable:
    return POLICY_LOSSES.get(name)


def register_loss_aggregation(name: str):
    return LOSS_AGGREGATIONS.register(name)


def get_loss_aggregation(name: str) -> Callable:
    return LOSS_AGGREGATIONS.get(name)


def register_kl_estimator(name: str):
    return KL_ESTIMATORS.register(name)


def get_kl_estimator(name: str) -> Callable:
    return KL_ESTIMATORS.get(name)
