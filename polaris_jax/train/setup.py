"""What every run trains, from the config: the ModelConfig (preset or HF config.json, with overrides),
LoRA on top, and the params placed in their shards. Shared by the SFT and GRPO loops and the tools.

Config sections read here:
  model:  preset, init_from (HF dir, '' = random init), overrides (ModelConfig fields; vocab_size 0 =
          the tokenizer's, rounded up to 8), param_dtype, compute_dtype, remat_policy, sequence_parallelism,
          attention_impl, moe_matmul, moe_capacity_factor, moe_dispatch_tokens
  lora:   rank (0 = full fine-tuning), alpha, targets
"""

from __future__ import annotations

import os

import jax
import ml_collections

from polaris_jax.data import synthetic_arith
from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.files import write_atomic
from polaris_jax.models import attention_kernels
from polaris_jax.models import lora as lora_lib
from polaris_jax.models.config import LORA_TARGETS, ConfigError, ModelConfig
from polaris_jax.models.hf_io import load_hf
from polaris_jax.models.presets import preset
from polaris_jax.models.sharding import param_shardings
from polaris_jax.train import partitioning


def add_model_sections(c: ml_collections.ConfigDict) -> None:
    """The `model` and `lora` sections this module reads, with their defaults, added to an experiment's schema
    (SFT and GRPO share them)."""
    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # a models.presets.PRESETS name or "tiny"; ignored when init_from is set
    c.model.init_from = ""  # Hugging Face checkpoint directory to start from ("" = random init)
    c.model.overrides = ml_collections.ConfigDict()  # ModelConfig fields; vocab_size 0 = the tokenizer's
    c.model.param_dtype = "float32"  # bfloat16 with optimizer.master_weights: a float32 master in the optimiser
    c.model.compute_dtype = "bfloat16"  # matmul inputs
    c.model.remat_policy = "dots_no_batch"  # none | full | dots | dots_no_batch | offload (full, inputs on host)
    # Attention when the mesh has a `sequence` axis (context parallelism): ulysses | ring.
    c.model.sequence_parallelism = "ulysses"
    # Training attention: auto (the platform's kernel where it fits) | dense | flash | splash (TPU) | cudnn (CUDA);
    # see models/attention_kernels.py.
    c.model.attention_impl = "auto"
    # MoE: the experts' grouped-matmul kernel (auto | ragged_dot | tiled), expert parallelism's capacity
    # factor (0 = dropless), and the dropless dispatch's run of tokens per device (0 = all at once; N bounds
    # its EP x N x k-row buffers); see models/moe.py.
    c.model.moe_matmul = "auto"
    c.model.moe_capacity_factor = 0.0
    c.model.moe_dispatch_tokens = 0
    # LoRA ("LoRA Without Regret"): use ~10x the full fine-tuning learning rate; see models/lora.py.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = full fine-tuning
    c.lora.alpha = 32.0
    c.lora.targets = LORA_TARGETS


def model_knobs(config) -> dict:
    """The ModelConfig fields the `model` section sets on any architecture: numerics, remat and kernels."""
    m = config.model
    return dict(
        param_dtype=m.param_dtype,
        compute_dtype=m.compute_dtype,
        remat_policy=m.remat_policy,
        sequence_parallelism=m.get("sequence_parallelism", "ulysses"),
        attention_impl=m.get("attention_impl", "auto"),
        moe_matmul=m.get("moe_matmul", "auto"),
        moe_capacity_factor=float(m.get("moe_capacity_factor", 0.0)),
        moe_dispatch_tokens=int(m.get("moe_dispatch_tokens", 0)),
    )


def model_config_from(config, tokenizer: Tokenizer | None = None, platform: str | None = "default") -> ModelConfig:
    """The ModelConfig a run trains (before LoRA), from init_from's config.json or a preset. A kernel that
    `platform` (default: JAX's backend; None: do not check) lacks is a ConfigError here, before any compile."""
    overrides = dict(config.model.overrides.to_dict()) if "overrides" in config.model else {}
    overrides.update(model_knobs(config))
    if overrides.get("vocab_size", None) == 0:
        if tokenizer is None:
            raise ValueError("model.overrides.vocab_size=0 takes the tokenizer's size, but there is no tokenizer")
        overrides["vocab_size"] = synthetic_arith.padded_vocab_size(tokenizer)
    if tokenizer is not None and not config.model.init_from and "eos_token_ids" not in overrides:
        overrides["eos_token_ids"] = tuple(tokenizer.eos_token_ids)
    try:
        if config.model.init_from:
            model_config = ModelConfig.from_hf(config.model.init_from, **overrides)
        elif config.model.preset == "tiny":
            model_config = ModelConfig.tiny(**overrides)
        else:
            model_config = preset(config.model.preset, **overrides)
    except TypeError as e:  # an override that is not a ModelConfig field
        raise ConfigError(f"model.overrides: {e}") from e
    if tokenizer is not None and tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_config.vocab_size}"
        )
    try:
        attention_kernels.check_platform(model_config, jax.default_backend() if platform == "default" else platform)
    except ConfigError as e:
        raise ConfigError(f"model.attention_impl: {e}") from e
    return model_config


def with_lora(config, model_config: ModelConfig) -> ModelConfig:
    if config.lora.rank <= 0:
        return model_config
    return model_config.replace(
        lora_rank=config.lora.rank, lora_alpha=float(config.lora.alpha), lora_targets=tuple(config.lora.targets)
    )


def build_params(config, model_config: ModelConfig, mesh, rules, rng):
    """(config actually trained, params in their shards, trainable mask). LoRA adapters are added on top."""
    init_rng, lora_rng = jax.random.split(rng)
    if config.model.init_from:
        shardings = param_shardings(model_config, mesh, rules)
        _, params = load_hf(
            config.model.init_from,
            dtype=model_config.param_dtype,
            shardings=shardings,
            config_overrides={k: getattr(model_config, k) for k in ("compute_dtype", "remat_policy")},
        )
    else:
        params = partitioning.init_sharded_params(model_config, init_rng, mesh, rules)
    if config.lora.rank <= 0:
        return model_config, params, jax.tree.map(lambda _: True, params)
    lora_config = with_lora(config, model_config)

    def add(base, key):  # builds only the adapters: XLA drops the unused fresh base weights
        return lora_lib.add_lora(
            model_config,
            base,
            key,
            rank=lora_config.lora_rank,
            alpha=lora_config.lora_alpha,
            targets=lora_config.lora_targets,
        )[1]

    params = jax.jit(add, out_shardings=param_shardings(lora_config, mesh, rules), donate_argnums=0)(params, lora_rng)
    return lora_config, params, lora_lib.lora_mask(params)


def write_run_config(config, workdir: str) -> None:
    """WORKDIR/config.json: the config a run was started with (process 0 writes)."""
    if jax.process_index() == 0:
        write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True))
