"""Qwen-family models as pure functions, presets, sharding rules and HF checkpoint I/O."""

from polaris_jax.models.attention import init_cache
from polaris_jax.models.config import ConfigError, ModelConfig
from polaris_jax.models.hf_io import load_hf, save_hf
from polaris_jax.models.lora import add_lora, lora_mask, merge_lora
from polaris_jax.models.params import init_params, param_axes, param_shapes
from polaris_jax.models.peft_io import load_peft, save_peft
from polaris_jax.models.presets import PRESETS, preset
from polaris_jax.models.sharding import DEFAULT_RULES, make_mesh, param_shardings, tree_shardings
from polaris_jax.models.transformer import forward, lm_head, logits, positions_from_mask

__all__ = [
    "ConfigError",
    "ModelConfig",
    "PRESETS",
    "preset",
    "init_cache",
    "init_params",
    "param_axes",
    "param_shapes",
    "forward",
    "lm_head",
    "logits",
    "positions_from_mask",
    "load_hf",
    "save_hf",
    "load_peft",
    "save_peft",
    "add_lora",
    "lora_mask",
    "merge_lora",
    "DEFAULT_RULES",
    "make_mesh",
    "param_shardings",
    "tree_shardings",
]
