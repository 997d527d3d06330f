"""Self-attention within segments (training, scoring, whole-sequence forward) by kernel and platform.

`ModelConfig.attention_impl` picks one:
- "dense" / "flash": the plain-JAX paths (`attention.grouped_attention` over an explicit mask, and the
  blockwise `flash_attention`), which run everywhere;
- "splash": TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, Mosaic): causal mask
  and segment ids inside the kernel, GQA without repeating keys, fused backward;
- "cudnn": cuDNN fused attention through `jax.nn.dot_product_attention(implementation="cudnn")` (bf16 or
  fp16 only; the packing segments go in as a boolean mask beside `is_causal`);
- "auto": staged with `jax.lax.platform_dependent`, so the platform the function is *lowered for* picks the
  branch, never the host's default backend: splash for "tpu", cuDNN for "cuda", and the plain-JAX rule
  (dense when small, flash beyond `flash_min_scores`) for "cpu" and wherever a kernel does not fit the
  shapes. Each choice is logged once per shape.

Both kernels take a padding query (segment 0) to see padding keys, where the plain-JAX paths let it see
nothing; either output is meaningless and the losses mask it, and no real query ever sees padding.

`check_platform` refuses a named kernel the backend lacks (splash off TPU, cuDNN off CUDA or in fp32)
with a ConfigError, which run setup raises before anything is compiled.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from polaris_jax.models import attention as attn_lib
from polaris_jax.models.config import ConfigError
from polaris_jax.models.flash_attention import flash_attention
from polaris_jax.models.sharding import current_activation_mesh, logical_to_spec
from polaris_jax.registry import Registry

log = logging.getLogger(__name__)

# Entries: (config, q, k, v, segments, *, local) -> [B, T, N, H]; each declares the `platforms` it runs on
# (jax backend names; the first is the one `platform_dependent` stages it for) and an `unfit(q, k)` check.
KERNELS = Registry("attention kernel", inputs=5)
SPLASH_LANES = 128  # splash's block sizes are multiples of the 128 TPU lanes
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check_platform(config, platform: str | None) -> None:
    """A ConfigError when `config.attention_impl` names a kernel `platform` (jax backend name) lacks."""
    impl = config.attention_impl
    if platform is None or impl not in KERNELS.names():
        return
    platforms = KERNELS.meta(impl)["platforms"]
    if platform not in platforms:
        raise ConfigError(
            f"attention_impl={impl!r} runs on {platforms[0]} only, not on {platform}; "
            "use 'auto' (the platform's kernel where it fits) or 'flash'"
        )
    if impl == "cudnn" and jnp.dtype(config.dtype) not in _CUDNN_DTYPES:
        raise ConfigError(f"attention_impl='cudnn' needs compute_dtype bfloat16 or float16, not {config.compute_dtype}")


def xla_attention(config, q_btnh, k_btkh, v_btkh, segment_ids_bt):
    """The plain-JAX rule: dense scores while small, blockwise beyond `flash_min_scores` (or when asked)."""
    t = q_btnh.shape[1]
    if config.use_flash_attention(t, t):
        blocks = dict(block_q=config.attention_block_q, block_kv=config.attention_block_kv)
        return flash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, segment_ids_bt, **blocks)
    return attn_lib.grouped_attention(q_btnh, k_btkh, v_btkh, attn_lib.self_mask(segment_ids_bt))


# -- splash (TPU) -----------------------------------------------------------------------------------------
def splash_unfit(q_btnh, k_btkh) -> str:
    if q_btnh.shape[-1] % 64:
        return f"head_dim={q_btnh.shape[-1]}: splash wants a multiple of 64"
    return ""


def _splash_block(config, t: int) -> int:
    """One block size for every splash pass: the config's, in whole lanes, no longer than the row."""
    padded_t = -(-t // SPLASH_LANES) * SPLASH_LANES
    return min(padded_t, max(SPLASH_LANES, config.attention_block_q // SPLASH_LANES * SPLASH_LANES))


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, padded_t: int, block: int, interpret: bool):
    mask = splash.MultiHeadMask([splash.CausalMask((padded_t, padded_t)) for _ in range(num_heads)])
    blocks = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        use_fused_bwd_kernel=True,
    )
    with jax.ensure_compile_time_eval():  # built while tracing: its tables must stay concrete
        kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    # Its mask tables as numpy, so every trace embeds them: device arrays cached here would be captured
    # constants, which jax.export cannot line up with the exported function's arguments.
    tables, static = kernel.tree_flatten()
    return type(kernel).tree_unflatten(static, jax.tree.map(np.asarray, tables))


def splash_attention(config, q_btnh, k_btkh, v_btkh, segment_ids_bt, *, interpret: bool = False):
    """Causal attention within segments by the splash kernel, one row at a time; rows padded to a block."""
    b, t, n, h = q_btnh.shape
    block = _splash_block(config, t)
    pad = -t % block
    kernel = _splash_kernel(n, t + pad, block, interpret)
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    heads_first = lambda x: jnp.transpose(widen(x), (0, 2, 1, 3))  # [B, heads, T, H]
    q = heads_first((q_btnh.astype(jnp.float32) * h**-0.5).astype(q_btnh.dtype))
    segments = widen(segment_ids_bt.astype(jnp.int32))

    def one_row(q_nth, k_kth, v_kth, seg_t):
        return kernel(q_nth, k_kth, v_kth, splash.SegmentIds(q=seg_t, kv=seg_t))

    rows = (q, heads_first(k_btkh), heads_first(v_btkh), segments)
    if interpret:  # the TPU interpreter takes no batched grid, so rows run one after another
        with pltpu.force_tpu_interpret_mode():
            out_bnth = jax.lax.map(lambda row: one_row(*row), rows)
    else:
        out_bnth = jax.vmap(one_row)(*rows)
    return jnp.transpose(out_bnth, (0, 2, 1, 3))[:, :t].astype(q_btnh.dtype)


@KERNELS.register("splash", platforms=("tpu",), unfit=splash_unfit)
def splash_on_mesh(config, q_btnh, k_btkh, v_btkh, segment_ids_bt, *, local: bool = False, interpret: bool = False):
    """Splash per device: a Mosaic call is opaque to the SPMD partitioner (it would gather every row), so under
    a mesh it runs in a shard_map over the batch and head shards (queries follow the kv heads' split)."""
    context = current_activation_mesh()
    kernel = functools.partial(splash_attention, config, interpret=interpret)
    if local or context is None:
        return kernel(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    mesh, rules = context
    kv_spec = logical_to_spec(("batch", None, "kv_heads", "head_dim"), mesh, rules, k_btkh.shape)
    q_spec = PartitionSpec(kv_spec[0], None, kv_spec[2], None)
    fn = jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(kv_spec[0], None)),
        out_specs=q_spec,
        check_vma=False,
    )
    return fn(q_btnh, k_btkh, v_btkh, segment_ids_bt)


# -- cuDNN (CUDA) -----------------------------------------------------------------------------------------
def cudnn_unfit(q_btnh, k_btkh) -> str:
    h = q_btnh.shape[-1]
    if jnp.dtype(q_btnh.dtype) not in _CUDNN_DTYPES:
        return f"{jnp.dtype(q_btnh.dtype).name} activations: cuDNN attention takes bfloat16 or float16"
    if h % 8 or h > 256:
        return f"head_dim={h}: cuDNN wants a multiple of 8, at most 256"
    if not _cudnn_traceable():
        return "no CUDA plugin with cuDNN beside this jaxlib, so cuDNN attention cannot be traced here"
    return ""


@functools.lru_cache(maxsize=1)
def _cudnn_traceable() -> bool:
    from jax._src.lib import cuda_versions  # None without the jax-cuda plugin

    try:
        return cuda_versions is not None and cuda_versions.cudnn_get_version() > 0
    except RuntimeError:  # the plugin without cuDNN's libraries
        return False


@KERNELS.register("cudnn", platforms=("cuda", "gpu"), unfit=cudnn_unfit)
def cudnn_attention(config, q_btnh, k_btkh, v_btkh, segment_ids_bt, *, local: bool = False):
    """Causal attention within segments by cuDNN's fused kernel (its own custom partitioning: no shard_map,
    so `local` changes nothing)."""
    del local
    same_segment_b1tt = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q_btnh, k_btkh, v_btkh, mask=same_segment_b1tt, is_causal=True, implementation="cudnn"
    ).astype(q_btnh.dtype)


# -- selection --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _log_choice(shape: tuple, choices: tuple) -> None:
    log.info("attention_impl=auto for q %s: %s", shape, ", ".join(f"{p}: {c}" for p, c in choices))


def self_attention(config, q_btnh, k_btkh, v_btkh, segment_ids_bt, *, local: bool = False):
    """Causal attention of [B, T, N, H] queries over [B, T, K, H] keys/values within equal segments (0 = padding),
    by `config.attention_impl`. `local=True` inside a shard_map (the per-device shapes are already split)."""
    impl = config.attention_impl
    args = (q_btnh, k_btkh, v_btkh, segment_ids_bt)
    if impl in KERNELS.names():
        return KERNELS.get(impl)(config, *args, local=local)
    fallback = functools.partial(xla_attention, config)
    if impl != "auto":
        return fallback(*args)
    branches, choices = {}, []
    for name in KERNELS.names():
        platform, unfit = KERNELS.meta(name)["platforms"][0], KERNELS.meta(name)["unfit"]
        reason = unfit(q_btnh, k_btkh)
        choices.append((platform, f"fallback ({reason})" if reason else name))
        if not reason:
            branches[platform] = functools.partial(KERNELS.get(name), config, local=local)
    t = q_btnh.shape[1]
    choices.append(("other", "flash" if config.use_flash_attention(t, t) else "dense"))
    _log_choice(tuple(np.shape(q_btnh)), tuple(choices))
    if not branches:
        return fallback(*args)
    return jax.lax.platform_dependent(*args, default=fallback, **branches)
