"""Presets by name: the published Qwen-family models this project trains, each checked against its
config.json in tests/golden/published_configs/."""

from __future__ import annotations

from polaris_jax.models.config import ConfigError, ModelConfig

PRESETS = {
    "qwen3_0p6b": ModelConfig.qwen3_0p6b,
    "qwen3_1p7b": ModelConfig.qwen3_1p7b,
    "qwen3_4b": ModelConfig.qwen3_4b,
    "qwen3_8b": ModelConfig.qwen3_8b,
    "qwen3_14b": ModelConfig.qwen3_14b,
    "deepseek_r1_0528_qwen3_8b": ModelConfig.deepseek_r1_0528_qwen3_8b,
    "qwen3_30b_a3b": ModelConfig.qwen3_30b_a3b,
    "qwen3_235b_a22b": ModelConfig.qwen3_235b_a22b,
    "qwen2p5_math_1p5b": ModelConfig.qwen2p5_math_1p5b,
    "qwen2p5_math_7b": ModelConfig.qwen2p5_math_7b,
    "r1_distill_qwen_1p5b": ModelConfig.r1_distill_qwen_1p5b,
    "r1_distill_qwen_7b": ModelConfig.r1_distill_qwen_7b,
    "r1_distill_qwen_14b": ModelConfig.r1_distill_qwen_14b,
}


def preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a published model by name (see PRESETS), with ModelConfig field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
