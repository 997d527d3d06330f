"""Hugging Face `config.json` <-> `ModelConfig` keyword arguments.

Both the Hub's older keys (`rope_theta`, `rope_scaling`, `torch_dtype`, `num_experts`) and the keys
transformers 5 writes (`rope_parameters`, `dtype`, `num_local_experts`) are read.
"""

from __future__ import annotations

from typing import Any

from polaris_jax.models.config import ARCHITECTURES, SUPPORTED_ROPE_TYPES, ConfigError

_DEFAULT_ROPE_THETA = {"qwen2": 10000.0, "qwen3": 10000.0, "qwen3_moe": 10000.0}


def _arch_of(hf: dict[str, Any]) -> str:
    names = hf.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = hf.get("model_type")
    if model_type in ARCHITECTURES.values():
        return model_type
    raise ConfigError(
        f"unknown architecture: architectures={names}, model_type={model_type!r}; supported: {sorted(ARCHITECTURES)}"
    )


def _rope(hf: dict[str, Any], arch: str, max_pos: int) -> tuple[float, tuple | None]:
    """Returns (rope_theta, rope_scaling tuple) from either key layout."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    # transformers 5 may nest per layer type; Qwen has one layer type.
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    theta = params.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA[arch]))
    merged = {**scaling, **{k: v for k, v in params.items() if k != "rope_theta"}}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_scaling.rope_type={rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return float(theta), None
    if merged.get("factor") is None:
        raise ConfigError("rope_scaling.factor is required for yarn")
    for key in ("mscale", "mscale_all_dim"):
        if merged.get(key):
            raise ConfigError(f"rope_scaling.{key} is not supported for Qwen YaRN")
    return float(theta), (
        "yarn",
        float(merged["factor"]),
        int(merged.get("original_max_position_embeddings") or max_pos),
        float(merged.get("beta_fast") or 32.0),
        float(merged.get("beta_slow") or 1.0),
        None if merged.get("attention_factor") is None else float(merged["attention_factor"]),
        bool(merged.get("truncate", True)),
    )


def config_kwargs_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    arch = _arch_of(hf)
    for required in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if required not in hf:
            raise ConfigError(f"config.json is missing required field {required!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported")
    heads = hf["num_attention_heads"]
    max_pos = int(hf.get("max_position_embeddings", 32768))
    theta, scaling = _rope(hf, arch, max_pos)
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={dtype!r} is not supported")
    eos = hf.get("eos_token_id")
    kwargs = dict(
        arch=arch,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(heads),
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        intermediate_size=int(hf.get("intermediate_size", 0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_norm=arch != "qwen2",
        param_dtype=dtype,
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
    )
    if arch == "qwen3_moe":
        kwargs.update(
            num_experts=int(hf.get("num_experts") or hf.get("num_local_experts") or 0),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 0)),
            moe_intermediate_size=int(hf.get("moe_intermediate_size", 0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        )
    return kwargs


def config_to_hf(config) -> dict[str, Any]:
    """The `config.json` transformers needs to load what `save_hf` writes."""
    arch_name = {v: k for k, v in ARCHITECTURES.items()}[config.arch]
    hf: dict[str, Any] = dict(
        architectures=[arch_name],
        model_type=config.arch,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        torch_dtype=config.param_dtype,
        use_sliding_window=False,
        attention_dropout=0.0,
    )
    if config.arch == "qwen3":
        hf["attention_bias"] = config.qkv_bias
    if config.eos_token_ids:
        hf["eos_token_id"] = list(config.eos_token_ids) if len(config.eos_token_ids) > 1 else config.eos_token_ids[0]
    if config.rope_scaling is not None:
        _, factor, orig, beta_fast, beta_slow, attn, truncate = config.rope_scaling
        hf["rope_scaling"] = dict(
            rope_type="yarn",
            factor=factor,
            original_max_position_embeddings=orig,
            beta_fast=beta_fast,
            beta_slow=beta_slow,
            truncate=truncate,
        )
        if attn is not None:
            hf["rope_scaling"]["attention_factor"] = attn
    if config.is_moe:
        hf.update(
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=config.decoder_sparse_step,
            mlp_only_layers=list(config.mlp_only_layers),
            router_aux_loss_coef=config.router_aux_loss_coef,
            output_router_logits=False,
        )
    return hf
