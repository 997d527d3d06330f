"""Lazy package faces: a name is imported from its module on first use, not when the package is.

    __getattr__, __dir__, __all__ = lazy.attach(__name__, submodules=("models", "data"),
                                                exports={"pass_at_k": "polaris_jax.evals.metrics"})

`submodules` become attributes that are the submodule itself; `exports` map a public name to the module
that defines it. Either way `import package` imports nothing more, and `package.name` (or
`from package import name`) imports the one module that holds it. Modelled on scientific-python's
lazy_loader (`lazy_loader.attach`), without the stub-file reader.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping


def attach(
    package: str, submodules: Iterable[str] = (), exports: Mapping[str, str] | None = None
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """(__getattr__, __dir__, __all__) for the package named `package` (pass `__name__`)."""
    submodules, exports = tuple(submodules), dict(exports or {})
    clash = set(submodules) & set(exports)
    if clash:
        raise ValueError(f"{package}: {sorted(clash)} are both submodules and exports")
    names = sorted(set(submodules) | set(exports))

    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[package], name, value)  # later look-ups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__, names
