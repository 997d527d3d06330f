"""Data: benchmark loaders, tokenizer and chat templates, SFT sources and grain pipelines.

Exports resolve lazily (`polaris_jax.lazy`) so that importing the package does not pull in tfds or grain.
"""

from polaris_jax import lazy

_EXPORTS = {
    "load_benchmark": "polaris_jax.data.benchmarks",
    "benchmark_names": "polaris_jax.data.benchmarks",
    "benchmark_file": "polaris_jax.data.benchmarks",
    "build_math_prompt": "polaris_jax.data.benchmarks",
    "Tokenizer": "polaris_jax.data.tokenizer",
    "qwen_tokenizer_offline": "polaris_jax.data.tokenizer",
}

__getattr__, __dir__, __all__ = lazy.attach(__name__, exports=_EXPORTS)
