"""polaris_jax: SFT distillation and GRPO-family RL for Qwen-family reasoning models in JAX."""

import importlib

__version__ = "0.1.0"
_SUBMODULES = ("models", "sampling", "rewards", "data", "train", "evals")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"polaris_jax.{name}")
    raise AttributeError(f"module 'polaris_jax' has no attribute {name!r}")
