"""Name -> function tables for the pluggable pieces of the RL objective.

A config selects an advantage estimator, a policy loss, a loss aggregation and a KL
estimator by name; adding an algorithm means registering one more function here, never
adding a flag to a trainer.
"""

from __future__ import annotations

from typing import Callable, TypeVar

Fn = TypeVar("Fn", bound=Callable)


class Registry:
    """A small decorator table: `@table.register("name")`, then `table.get("name")`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._fns: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Fn], Fn]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(fn: Fn) -> Fn:
            if name in self._fns and self._fns[name] is not fn:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered to "
                    f"{self._fns[name].__module__}.{self._fns[name].__qualname__}"
                )
            self._fns[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        try:
            return self._fns[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: str) -> bool:
        return name in self._fns


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
