"""Name -> function tables for every pluggable kind (rewards, advantage estimators, policy losses, ...).

An entry is a plain function: its first `inputs` positional arguments are the data, and its keyword
arguments after them are its own knobs, which a config names beside it (e.g. `algo.policy_loss_kwargs`)
and `bind` checks against the signature before anything runs. An entry may also declare facts about
itself at registration (`@table.register("grpo", min_group_size=2)`), read back with `meta`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

Fn = TypeVar("Fn", bound=Callable)
_KNOB_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class Registry:
    """A small decorator table: `@table.register("name", **meta)`, then `table.get("name")`."""

    def __init__(self, kind: str, inputs: int = 1):
        self.kind = kind
        self.inputs = inputs
        self._fns: dict[str, Callable] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta) -> Callable[[Fn], Fn]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(fn: Fn) -> Fn:
            if name in self._fns and self._fns[name] is not fn:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered to "
                    f"{self._fns[name].__module__}.{self._fns[name].__qualname__}"
                )
            self._fns[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        try:
            return self._fns[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def meta(self, name: str) -> dict[str, Any]:
        """What the entry declared about itself when it was registered."""
        self.get(name)
        return dict(self._meta[name])

    def knobs(self, name: str) -> tuple[str, ...]:
        """The keyword arguments the entry takes after its `inputs` data arguments."""
        params = list(inspect.signature(self.get(name)).parameters.values())[self.inputs :]
        return tuple(p.name for p in params if p.kind in _KNOB_KINDS)

    def bind(self, name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """`kwargs` as a dict, after checking them against the entry's signature; a ValueError names the
        entry and the unknown or missing argument."""
        kwargs = dict(kwargs)
        try:
            inspect.signature(self.get(name)).bind(*(None,) * self.inputs, **kwargs)
        except TypeError as error:
            raise ValueError(
                f"{self.kind} {name!r}: {error} (its keyword arguments: {', '.join(self.knobs(name)) or 'none'})"
            ) from None
        return kwargs

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: str) -> bool:
        return name in self._fns
