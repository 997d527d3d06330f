"""Data: benchmark loaders, tokenizer and chat templates, SFT sources and grain pipelines.

Exports resolve lazily so that importing the package does not pull in tfds or grain.
"""

import importlib

_EXPORTS = {
    "load_benchmark": "polaris_jax.data.benchmarks",
    "benchmark_names": "polaris_jax.data.benchmarks",
    "benchmark_file": "polaris_jax.data.benchmarks",
    "build_math_prompt": "polaris_jax.data.benchmarks",
    "Tokenizer": "polaris_jax.data.tokenizer",
    "qwen_tokenizer_offline": "polaris_jax.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'polaris_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
