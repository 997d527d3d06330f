"""Name -> function tables for every pluggable kind (rewards, advantage estimators, policy losses, ...)."""

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
