"""One decoder layer: RMSNorm, attention (QKV bias / QK-norm), SwiGLU MLP or top-k MoE.

Projections are einsums over named weights; a weight `w` may carry a LoRA pair `w_lora_a`, `w_lora_b`
in the same layer dict, applied as x@w + (alpha/rank)·(x@a)@b without materialising the sum.

Multi-LoRA (several adapters in one batch): the pairs are stacked [A, ...] with each adapter's scale
folded into its B (`models.lora.stack_adapters`), and the layer dict carries ADAPTER_ROWS, int32 [B]:
row b uses adapter ADAPTER_ROWS[b]. Decoding (one token a row) computes every adapter's x@a and keeps
the rows' own by a one-hot mask: it is bound by reading weights, and this reads each adapter's factors
once, where gathering factors per row would read them once per row. With many tokens a row (prefill,
training) each row's factors are gathered instead, so the compute is one adapter's, not every slot's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from polaris_jax.models import attention as attn_lib
from polaris_jax.models import attention_kernels, context_parallel, cpu_gemm, moe, paged_attention, paged_kernels
from polaris_jax.models.flash_attention import flash_attention
from polaris_jax.models.rope import apply_rope

LAYER_INPUT = "layer_input"  # the name of a layer's input residual stream, for remat policies
ADAPTER_ROWS = "adapter_rows_b"  # multi-LoRA: each row's adapter, beside the layer's weights
_GATHERED_B_LIMIT = 2**24  # elements of B factors gathered per row at most (beyond: the one-hot form)

# einsum of the base weight, then of the LoRA A and B factors (rank axis "r").
_PROJ = {
    "q": ("btd,dnh->btnh", "btd,dr->btr", "btr,rnh->btnh"),
    "k": ("btd,dnh->btnh", "btd,dr->btr", "btr,rnh->btnh"),
    "v": ("btd,dnh->btnh", "btd,dr->btr", "btr,rnh->btnh"),
    "o": ("btah,ahd->btd", "btah,ahr->btr", "btr,rd->btd"),  # axes named to sort in storage order (no transpose)
    "gate": ("btd,df->btf", "btd,dr->btr", "btr,rf->btf"),
    "up": ("btd,df->btf", "btd,dr->btr", "btr,rf->btf"),
    "down": ("btf,fd->btd", "btf,fr->btr", "btr,rd->btd"),
}


def rms_norm(x, weight, eps: float):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def lora_scale(config) -> float:
    return config.lora_alpha / config.lora_rank if config.lora_rank else 0.0


def project(config, layer: dict, name: str, x):
    dtype = config.dtype
    base_eq, a_eq, b_eq = _PROJ[name]
    if isinstance(layer[name], cpu_gemm.PackedWeight):  # CPU decode layout (sampling)
        y = cpu_gemm.matmul(x, layer[name])
    else:  # fp32 accumulation: also the fast bf16 path on XLA CPU.
        y = jnp.einsum(base_eq, x, layer[name].astype(dtype), preferred_element_type=jnp.float32)
    if name + "_lora_a" in layer:
        y = y + lora_delta(config, layer, name, x, a_eq, b_eq)
    return y.astype(dtype)


def lora_delta(config, weights: dict, name: str, x, a_eq: str, b_eq: str):
    """(alpha/rank)·(x@a)@b in float32 for the pair `name`_lora_a/b in `weights`, or with stacked pairs and
    ADAPTER_ROWS in `weights`, each row's own adapter (scale already in b)."""
    dtype = x.dtype
    a, b = weights[name + "_lora_a"].astype(dtype), weights[name + "_lora_b"].astype(dtype)
    rows_b = weights.get(ADAPTER_ROWS)
    if rows_b is None:
        low = jnp.einsum(a_eq, x, a, preferred_element_type=jnp.float32)
        return lora_scale(config) * jnp.einsum(b_eq, low.astype(dtype), b, preferred_element_type=jnp.float32)
    (x_s, a_s), low_s = a_eq.split("->")[0].split(","), a_eq.split("->")[1]
    (low_in, b_s), out_s = b_eq.split("->")[0].split(","), b_eq.split("->")[1]
    slots, rows = a.shape[0], rows_b.shape[0]
    onehot_bz = jax.nn.one_hot(rows_b, slots, dtype=jnp.float32).reshape((rows,) + (1,) * (len(low_s) - 2) + (slots, 1))
    if x.shape[1] > 1:  # many tokens a row (prefill, training): x@a with the row's own factor, gathered
        low = jnp.einsum(f"{x_s},b{a_s}->{low_s}", x, a[rows_b], preferred_element_type=jnp.float32)
        if rows * b[0].size <= _GATHERED_B_LIMIT:
            return jnp.einsum(
                f"{low_in},b{b_s}->{out_s}", low.astype(dtype), b[rows_b], preferred_element_type=jnp.float32
            )
        each_low = low[..., None, :] * onehot_bz  # a wide b (the unembedding's): not copied per row
    else:  # decoding: every adapter's x@a, each row keeping its own (each factor read once)
        each_low = jnp.einsum(f"{x_s},z{a_s}->{low_s[:-1]}zr", x, a, preferred_element_type=jnp.float32) * onehot_bz
    return jnp.einsum(f"{low_in[:-1]}zr,z{b_s}->{out_s}", each_low.astype(dtype), b, preferred_element_type=jnp.float32)


def attention_block(config, layer, x_btd, cos_btd, sin_btd, segment_ids_bt, cache_layer, cache_meta):
    """Returns (output [B,T,D], (k_cache, v_cache) or None)."""
    q = project(config, layer, "q", x_btd)
    k = project(config, layer, "k", x_btd)
    v = project(config, layer, "v", x_btd)
    if config.qkv_bias:
        q, k, v = (t + layer[n + "_bias"].astype(t.dtype) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    if config.qk_norm:
        q = rms_norm(q, layer["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], config.rms_norm_eps)
    q, k = apply_rope(q, cos_btd, sin_btd), apply_rope(k, cos_btd, sin_btd)
    blocks = dict(block_q=config.attention_block_q, block_kv=config.attention_block_kv)
    b, t = segment_ids_bt.shape
    if cache_meta is not None and "page_table_bp" in cache_meta:
        k_pages, v_pages = paged_attention.write_pages(
            *cache_layer, cache_meta["page_table_bp"], cache_meta["positions_bt"], k, v
        )
        out = paged_kernels.attend_by_platform(  # the Pallas kernel of the platform, or the reference
            q,
            k_pages,
            v_pages,
            cache_meta["page_table_bp"],
            cache_meta["lengths_b"],
            cache_meta["positions_bt"],
            scale=q.shape[-1] ** -0.5,
            impl=config.paged_attention_impl,
        )
        new_cache_layer = (k_pages, v_pages)
    elif cache_layer is None:
        if context_parallel.sequence_axis() is not None:  # rows split over the `sequence` mesh axis
            out = context_parallel.attention(config, q, k, v, segment_ids_bt)
        else:  # the platform's kernel or plain JAX, by config.attention_impl
            out = attention_kernels.self_attention(config, q, k, v, segment_ids_bt)
        new_cache_layer = None
    else:
        k_cache, v_cache = attn_lib.write_cache_layer(*cache_layer, k, v, cache_meta["end"])
        valid_bs = cache_meta["valid_bs"]
        if config.use_flash_attention(t, valid_bs.shape[1]):
            # The cache's validity is the key mask; every query counts as segment 1 (see flash_attention).
            out = flash_attention(
                q,
                attn_lib.length_major(k_cache).astype(q.dtype),
                attn_lib.length_major(v_cache).astype(q.dtype),
                jnp.ones((b, t), jnp.int32),
                valid_bs,
                cache_meta["end"],
                **blocks,
            )
        else:
            out = attn_lib.grouped_attention(
                q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), cache_meta["mask_bts"]
            )
        new_cache_layer = (k_cache, v_cache)
    return project(config, layer, "o", out), new_cache_layer


def mlp_block(config, layer, x_btd):
    gate = project(config, layer, "gate", x_btd)
    up = project(config, layer, "up", x_btd)
    return project(config, layer, "down", jax.nn.silu(gate) * up)


def decoder_layer(
    config,
    kind,
    layer,
    x_btd,
    cos_btd,
    sin_btd,
    segment_ids_bt,
    cache_layer,
    cache_meta,
    routed_btk=None,
    adapter_rows_b=None,
):
    if adapter_rows_b is not None:
        layer = {**layer, ADAPTER_ROWS: adapter_rows_b}
    x_btd = checkpoint_name(x_btd, LAYER_INPUT)  # what remat_policy=offload keeps, in host memory
    h = rms_norm(x_btd, layer["attn_norm"], config.rms_norm_eps)
    attn_out, new_cache_layer = attention_block(
        config, layer, h, cos_btd, sin_btd, segment_ids_bt, cache_layer, cache_meta
    )
    x_btd = x_btd + attn_out
    h = rms_norm(x_btd, layer["mlp_norm"], config.rms_norm_eps)
    if kind == "moe":
        mlp_out, stats = moe.moe_block(config, layer, h, segment_ids_bt != 0, routed_btk)
    else:
        mlp_out, stats = mlp_block(config, layer, h), None
    return x_btd + mlp_out, new_cache_layer, stats
