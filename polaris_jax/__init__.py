"""polaris_jax: SFT distillation and GRPO-family RL for Qwen-family reasoning models in JAX.

Subpackages load on first use (`polaris_jax.models`, ...), so `import polaris_jax` imports nothing heavy.
"""

from polaris_jax import lazy

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy.attach(
    __name__, submodules=("models", "data", "sampling", "rewards", "rollout", "train", "evals", "tools", "files")
)
