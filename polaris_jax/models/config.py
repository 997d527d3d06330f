"""Model sizes as data: `ModelConfig`, presets and the Hugging Face `config.json` reader."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# offload = full, with each layer's input (the residuals a full remat keeps) in pinned host memory.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
ATTENTION_IMPLS = ("auto", "dense", "flash", "splash", "cudnn")
SEQUENCE_PARALLELISMS = ("ulysses", "ring")
MOE_MATMULS = ("auto", "ragged_dot", "tiled")
PAGED_ATTENTION_IMPLS = ("auto", "xla", "gpu", "tpu", "cpu")  # models.paged_kernels
SUPPORTED_ROPE_TYPES = ("default", "yarn")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # per layer: the default targets
UNEMBED_TARGET = "lm_head"  # the output projection (Tinker's train_unembed); opt-in


class ConfigError(ValueError):
    """A model config value we cannot honour; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a Qwen2 / Qwen2.5 / Qwen3 / Qwen3-MoE decoder."""

    arch: str = "qwen3"  # qwen2 | qwen3 | qwen3_moe
    vocab_size: int = 151936
    hidden_size: int = 1024
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # YaRN: ("yarn", factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor or None, truncate)
    rope_scaling: tuple | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 / Qwen2.5
    qk_norm: bool = True  # Qwen3: RMSNorm on q and k per head, before RoPE
    # Mixture of experts (qwen3_moe)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    moe_matmul: str = "auto"  # grouped-matmul kernel of the experts (models.grouped_matmul)
    moe_capacity_factor: float = 0.0  # expert parallelism's send buffer; 0 = dropless (models.moe)
    moe_dispatch_tokens: int = 0  # dropless: each device's tokens dispatched in runs of this many; 0 = all at once
    # Numerics
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"
    # Attention over T > 1 queries: dense [T, S] scores, blockwise (models.flash_attention) with O(T·block)
    # memory, or a platform kernel (splash on TPU, cudnn on CUDA: models.attention_kernels). auto = the
    # platform's kernel where it fits, else flash once T·S exceeds flash_min_scores (dense is faster when small).
    attention_impl: str = "auto"
    attention_block_q: int = 512
    attention_block_kv: int = 512
    flash_min_scores: int = 1024 * 1024
    # Decode attention over KV pages (models.paged_kernels): auto = the platform's Pallas kernel where it fits,
    # xla = the plain-JAX reference, gpu / tpu = that Pallas kernel (the engine's `attention_kernel` sets it).
    paged_attention_impl: str = "auto"
    # Attention when a `sequence` mesh axis splits rows (models.context_parallel): ulysses | ring.
    sequence_parallelism: str = "ulysses"
    eos_token_ids: tuple[int, ...] = ()
    # LoRA adapters (0 = none): x@W + (alpha/rank)*(x@A)@B on the named projections.
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        if self.arch not in ARCHITECTURES.values():
            raise ConfigError(f"arch={self.arch!r} is not one of {sorted(ARCHITECTURES.values())}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {sorted(_DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.sequence_parallelism not in SEQUENCE_PARALLELISMS:
            raise ConfigError(
                f"sequence_parallelism={self.sequence_parallelism!r} is not one of {SEQUENCE_PARALLELISMS}"
            )
        if self.paged_attention_impl not in PAGED_ATTENTION_IMPLS:
            raise ConfigError(
                f"paged_attention_impl={self.paged_attention_impl!r} is not one of {PAGED_ATTENTION_IMPLS}"
            )
        if self.moe_matmul not in MOE_MATMULS:
            raise ConfigError(f"moe_matmul={self.moe_matmul!r} is not one of {MOE_MATMULS}")
        if self.moe_capacity_factor < 0:
            raise ConfigError(f"moe_capacity_factor={self.moe_capacity_factor} must be >= 0 (0 = dropless)")
        if self.moe_dispatch_tokens < 0 or (self.moe_dispatch_tokens and self.moe_capacity_factor > 0):
            raise ConfigError(
                f"moe_dispatch_tokens={self.moe_dispatch_tokens} must be >= 0 and applies to the dropless dispatch "
                f"only (moe_capacity_factor={self.moe_capacity_factor}; a capacity is per dispatch)"
            )
        if min(self.attention_block_q, self.attention_block_kv) < 1:
            raise ConfigError(f"attention blocks ({self.attention_block_q}, {self.attention_block_kv}) must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        bad_targets = set(self.lora_targets) - set(LORA_TARGETS + (UNEMBED_TARGET,))
        if bad_targets:
            raise ConfigError(f"lora_targets {sorted(bad_targets)} are not among {LORA_TARGETS + (UNEMBED_TARGET,)}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank={self.lora_rank} must be >= 0")
        if self.is_moe and not (self.num_experts > 0 and 0 < self.num_experts_per_tok <= self.num_experts):
            raise ConfigError(
                f"qwen3_moe needs 0 < num_experts_per_tok ({self.num_experts_per_tok}) "
                f"<= num_experts ({self.num_experts})"
            )

    # -- derived ---------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.arch == "qwen3_moe"

    @property
    def dtype(self):
        return _DTYPES[self.compute_dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    def use_flash_attention(self, num_queries: int, num_keys: int) -> bool:
        """Whether plain-JAX attention of `num_queries` over `num_keys` runs blockwise (see `attention_impl`;
        the kernels' configs use the auto rule where no kernel runs, e.g. prefill over a cache)."""
        if self.attention_impl not in ("dense", "flash"):
            return num_queries > 1 and num_queries * num_keys > self.flash_min_scores
        return self.attention_impl == "flash" and num_queries > 1

    def layer_is_moe(self, layer: int) -> bool:
        """Transformers' rule for which decoder layers use the sparse MoE block."""
        return self.is_moe and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def layer_runs(self) -> list[tuple[str, int, int]]:
        """Contiguous runs of same-kind layers: [(kind, first_layer, count)]; each run is one scan."""
        runs: list[tuple[str, int, int]] = []
        for layer in range(self.num_layers):
            kind = "moe" if self.layer_is_moe(layer) else "dense"
            if runs and runs[-1][0] == kind:
                runs[-1] = (kind, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((kind, layer, 1))
        return runs

    def num_layers_of(self, kind: str) -> int:
        return sum(count for k, _, count in self.layer_runs() if k == kind)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # -- presets ---------------------------------------------------------------
    @classmethod
    def tiny(cls, arch: str = "qwen3", **overrides) -> ModelConfig:
        """A few-hundred-KB model for tests and CPU demos."""
        base = dict(
            arch=arch,
            vocab_size=256,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            intermediate_size=128,
            max_position_embeddings=2048,
            rope_theta=10000.0,
            qkv_bias=arch == "qwen2",
            qk_norm=arch != "qwen2",
        )
        if arch == "qwen3_moe":
            base.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def qwen3_0p6b(cls, **kw):
        return cls(
            **{
                **dict(
                    hidden_size=1024,
                    num_layers=28,
                    num_heads=16,
                    num_kv_heads=8,
                    intermediate_size=3072,
                    tie_word_embeddings=True,
                ),
                **kw,
            }
        )

    @classmethod
    def qwen3_1p7b(cls, **kw):
        return cls(
            **{
                **dict(
                    hidden_size=2048,
                    num_layers=28,
                    num_heads=16,
                    num_kv_heads=8,
                    intermediate_size=6144,
                    tie_word_embeddings=True,
                ),
                **kw,
            }
        )

    @classmethod
    def qwen3_4b(cls, **kw):
        return cls(
            **{
                **dict(
                    hidden_size=2560,
                    num_layers=36,
                    num_heads=32,
                    num_kv_heads=8,
                    intermediate_size=9728,
                    tie_word_embeddings=True,
                ),
                **kw,
            }
        )

    @classmethod
    def qwen3_8b(cls, **kw):
        """Qwen3-8B (40960 positions; 131072 with YaRN)."""
        return cls(
            **{
                **dict(
                    hidden_size=4096,
                    num_layers=36,
                    num_heads=32,
                    num_kv_heads=8,
                    intermediate_size=12288,
                    max_position_embeddings=131072 if kw.get("rope_scaling") else 40960,
                ),
                **kw,
            }
        )

    @classmethod
    def deepseek_r1_0528_qwen3_8b(cls, **kw):
        """DeepSeek-R1-0528-Qwen3-8B: Qwen3-8B's shape with YaRN x4 over 32768 positions (131072 in all)."""
        return cls.qwen3_8b(**{**dict(rope_scaling=("yarn", 4.0, 32768, 32.0, 1.0, None, True)), **kw})

    @classmethod
    def qwen3_14b(cls, **kw):
        return cls(
            **{**dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=8, intermediate_size=17408), **kw}
        )

    @classmethod
    def qwen3_30b_a3b(cls, **kw):
        return cls(
            **{
                **dict(
                    arch="qwen3_moe",
                    hidden_size=2048,
                    num_layers=48,
                    num_heads=32,
                    num_kv_heads=4,
                    intermediate_size=6144,
                    num_experts=128,
                    num_experts_per_tok=8,
                    moe_intermediate_size=768,
                ),
                **kw,
            }
        )

    @classmethod
    def qwen3_235b_a22b(cls, **kw):
        return cls.qwen3_30b_a3b(
            **{
                **dict(
                    hidden_size=4096,
                    num_layers=94,
                    num_heads=64,
                    num_kv_heads=4,
                    intermediate_size=12288,
                    moe_intermediate_size=1536,
                ),
                **kw,
            }
        )

    @classmethod
    def _qwen2(cls, **kw):
        return cls(**{**dict(arch="qwen2", qkv_bias=True, qk_norm=False, rms_norm_eps=1e-6), **kw})

    @classmethod
    def qwen2p5_math_1p5b(cls, **kw):
        return cls._qwen2(
            **{
                **dict(
                    vocab_size=151936,
                    hidden_size=1536,
                    num_layers=28,
                    num_heads=12,
                    num_kv_heads=2,
                    head_dim=128,
                    intermediate_size=8960,
                    rope_theta=10000.0,
                    max_position_embeddings=4096,
                    tie_word_embeddings=True,
                ),
                **kw,
            }
        )

    @classmethod
    def qwen2p5_math_7b(cls, **kw):
        return cls._qwen2(
            **{
                **dict(
                    vocab_size=152064,
                    hidden_size=3584,
                    num_layers=28,
                    num_heads=28,
                    num_kv_heads=4,
                    head_dim=128,
                    intermediate_size=18944,
                    rope_theta=10000.0,
                    max_position_embeddings=4096,
                ),
                **kw,
            }
        )

    @classmethod
    def r1_distill_qwen_1p5b(cls, **kw):
        return cls.qwen2p5_math_1p5b(**{**dict(max_position_embeddings=131072, tie_word_embeddings=False), **kw})

    @classmethod
    def r1_distill_qwen_7b(cls, **kw):
        return cls.qwen2p5_math_7b(**{**dict(max_position_embeddings=131072), **kw})

    @classmethod
    def r1_distill_qwen_14b(cls, **kw):
        return cls._qwen2(
            **{
                **dict(
                    vocab_size=152064,
                    hidden_size=5120,
                    num_layers=48,
                    num_heads=40,
                    num_kv_heads=8,
                    head_dim=128,
                    intermediate_size=13824,
                    rope_theta=1_000_000.0,
                    rms_norm_eps=1e-5,
                    max_position_embeddings=131072,
                ),
                **kw,
            }
        )

    # -- Hugging Face ----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | os.PathLike, **overrides) -> ModelConfig:
        """Builds a config from a HF `config.json` (a dict, a file path or a checkpoint directory)."""
        if not isinstance(hf, dict):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else os.fspath(hf)
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as f:
                hf = json.load(f)
        from polaris_jax.models.hf_config import config_kwargs_from_hf

        return cls(**{**config_kwargs_from_hf(hf), **overrides})

    def to_hf(self) -> dict[str, Any]:
        from polaris_jax.models.hf_config import config_to_hf

        return config_to_hf(self)
