"""The Qwen-family decoder as a pure function of (config, params, tokens, positions, segments, cache).

Layers are stacked per kind (dense / moe) and run with `lax.scan`; a config whose kinds interleave
(`mlp_only_layers`, `decoder_sparse_step`) is run as consecutive scans over contiguous runs.

Decode layout: when the params hold each kind's layers as a tuple of per-layer dicts
(`unstack_layers`) or the cache is per-layer (`init_cache(per_layer=True)`), the layers run one by one
instead. Every layer's weights and cache are then separate buffers: XLA on CPU otherwise copies each
layer's slice out of the stack at every step, which dominates single-token decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from polaris_jax.models import attention as attn_lib
from polaris_jax.models import context_parallel, cpu_gemm, embedding, moe, paged_attention
from polaris_jax.models.layers import ADAPTER_ROWS, LAYER_INPUT, decoder_layer, lora_delta, rms_norm
from polaris_jax.models.rope import rope_cos_sin
from polaris_jax.models.sharding import constrain, current_activation_mesh

_RESIDUAL_AXES = ("batch", "length", "embed")

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Everything recomputed, and the one tensor per layer a full remat keeps (its input, [B, T, D]) moved to
    # pinned host memory in the forward pass and back for the backward (MaxText's offloaded decoder input).
    # XLA on CPU lowers the moves to nothing; on GPU/TPU the stacked [L, B, T, D] then leaves device memory.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=(LAYER_INPUT,),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def _run_params(config, params, kind: str, first: int, count: int):
    """The stacked params of one run, sliced out of its kind's stack when kinds interleave."""
    stack = params[kind + "_layers"]
    offset = sum(c for k, f, c in config.layer_runs() if k == kind and f < first)
    if offset == 0 and count == config.num_layers_of(kind):
        return stack
    if isinstance(stack, (list, tuple)):
        return tuple(stack[offset : offset + count])
    return jax.tree.map(lambda p: p[offset : offset + count], stack)


def unstack_layers(params) -> dict:
    """The decode layout of the params: each `<kind>_layers` stack becomes a tuple of per-layer dicts, and a
    tied embedding gets an [embed, vocab] copy as `lm_head` (XLA CPU reads it about 1.7x faster than the
    [vocab, embed] table at decode batch sizes)."""
    out = dict(params)
    if "lm_head" not in params:
        out["lm_head"] = params["embed"].T
    for name, stack in params.items():
        if name.endswith("_layers") and not isinstance(stack, (list, tuple)):
            out[name] = per_layer(stack)
    return out


def per_layer(stack: dict) -> tuple:
    """A stack of layer params ([L, ...] leaves) as a tuple of L per-layer dicts."""
    count = jax.tree.leaves(stack)[0].shape[0]
    return tuple(jax.tree.map(lambda p, i=i: p[i], stack) for i in range(count))


def _unrolled_run(config, kind, layers, x_btd, cos, sin, segment_ids_bt, cache_kv, cache_meta, routed, adapter_rows_b):
    """The same layers as `_scan_run`, one at a time, over per-layer params and caches."""
    count = len(layers) if isinstance(layers, (list, tuple)) else jax.tree.leaves(layers)[0].shape[0]
    layer_fn = functools.partial(decoder_layer, config, kind)
    if config.remat_policy != "none":
        layer_fn = jax.checkpoint(layer_fn, policy=_REMAT[config.remat_policy], prevent_cse=False)
    new_k, new_v, stats_list = [], [], []
    for i in range(count):
        layer = layers[i] if isinstance(layers, (list, tuple)) else jax.tree.map(lambda p: p[i], layers)
        kv = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i])
        routed_btk = None if routed is None else routed[i]
        x_btd, new_kv, stats = layer_fn(
            layer, x_btd, cos, sin, segment_ids_bt, kv, cache_meta, routed_btk, adapter_rows_b
        )
        if new_kv is not None:
            new_k.append(new_kv[0])
            new_v.append(new_kv[1])
        stats_list.append(stats)
    stats = None if stats_list[0] is None else jax.tree.map(lambda *xs: jnp.stack(xs), *stats_list)
    if cache_kv is None:
        return x_btd, (None, stats)
    pack = tuple if isinstance(cache_kv[0], (list, tuple)) else jnp.stack
    return x_btd, ((pack(new_k), pack(new_v)), stats)


def _scan_run(config, kind, stack, x_btd, cos, sin, segment_ids_bt, cache_kv, cache_meta, routed, adapter_rows_b):
    def body(x, xs):
        layer, kv, routed_btk = xs
        x, new_kv, stats = decoder_layer(
            config, kind, layer, x, cos, sin, segment_ids_bt, kv, cache_meta, routed_btk, adapter_rows_b
        )
        return constrain(x, _RESIDUAL_AXES), (new_kv, stats)

    if config.remat_policy != "none":
        body = jax.checkpoint(body, policy=_REMAT[config.remat_policy], prevent_cse=False)
    return jax.lax.scan(body, x_btd, (stack, cache_kv, routed))


def lm_head(config, params, hidden_btd, adapter_rows_b=None) -> jnp.ndarray:
    """Final projection to float32 logits [B, T, V] (a tied model's `lm_head` copy, if any: `unstack_layers`),
    plus its LoRA (`lm_head_lora_a/b`, stacked with `adapter_rows_b`: see models.layers) when present."""
    logits_btv = _unembed(config, params, hidden_btd)
    if "lm_head_lora_a" in params:
        weights = params if adapter_rows_b is None else {**params, ADAPTER_ROWS: adapter_rows_b}
        logits_btv = logits_btv + lora_delta(config, weights, "lm_head", hidden_btd, "btd,dr->btr", "btr,rv->btv")
    return logits_btv


def _unembed(config, params, hidden_btd) -> jnp.ndarray:
    if config.tie_word_embeddings and "lm_head" not in params:
        return jnp.einsum(
            "btd,vd->btv", hidden_btd, params["embed"].astype(hidden_btd.dtype), preferred_element_type=jnp.float32
        )
    if isinstance(params["lm_head"], cpu_gemm.PackedWeight):
        return cpu_gemm.matmul(hidden_btd, params["lm_head"])
    return jnp.einsum(
        "btd,dv->btv", hidden_btd, params["lm_head"].astype(hidden_btd.dtype), preferred_element_type=jnp.float32
    )


def router_aux_loss(config, stats_list) -> jnp.ndarray:
    """transformers' `load_balancing_loss_func` over all MoE layers: E · Σ_ke f_ke · P_e (masked means)."""
    dispatch_ke = sum(jnp.sum(s["dispatch_ke"], axis=0) for s in stats_list)
    prob_e = sum(jnp.sum(s["prob_e"], axis=0) for s in stats_list)
    tokens = sum(jnp.sum(s["tokens"]) for s in stats_list)
    denom = jnp.maximum(tokens, 1.0)
    return config.num_experts * jnp.sum((dispatch_ke / denom) * (prob_e / denom)[None, :])


def forward(
    config,
    params,
    tokens_bt,
    positions_bt,
    *,
    segment_ids_bt=None,
    cache=None,
    return_hidden: bool = False,
    return_aux: bool = False,
    routed_experts=None,
    adapter_rows_b=None,
):
    """Runs the decoder.

    Args:
      tokens_bt, positions_bt: int32 [B, T]; positions are explicit (left padding, packing, decode).
      segment_ids_bt: int32 [B, T]; attention stays within equal non-zero ids, 0 marks padding.
        Defaults to all ones.
      cache: from `init_cache`; if given, the T tokens are written at `cache["end"]` and attend to every
        valid earlier slot (segments are then only a validity mask). Or a paged cache,
        dict(k, v, page_table_bp) (`paged_attention.init_kv_pages` plus each row's page table): each token
        is written at its position in its row's pages and attends to the row's positions up to its own;
        tokens with segment id 0 are padding (neither written nor attending).
    Returns:
      (logits_btv float32, new_cache) — hidden states instead of logits if `return_hidden` — plus an aux
      dict {"router_aux_loss", and for MoE "router" (models.moe.router_counts) and "routed_experts"} when
      `return_aux`: routed_experts int32 [MoE layers, B, T, k] holds the experts each token used.
    routed_experts: router replay: int [MoE layers, B, T, k] expert ids (e.g. recorded by the engine while
      sampling) used instead of the router's top-k; -1 entries route as usual. The weights are the router's
      probabilities of the replayed experts, so the router still trains.
    adapter_rows_b: multi-LoRA: int32 [B], row b's adapter, when the params' adapter leaves are stacked
      (`models.lora.stack_adapters`).
    """
    if segment_ids_bt is None:
        segment_ids_bt = jnp.ones(tokens_bt.shape, jnp.int32)
    zigzag = _ring_order(config, tokens_bt.shape[1]) if cache is None else None
    if zigzag is not None:  # ring attention's load-balanced layout (models.context_parallel)
        tokens_bt, positions_bt, segment_ids_bt = (x[:, zigzag] for x in (tokens_bt, positions_bt, segment_ids_bt))
        routed_experts = None if routed_experts is None else routed_experts[:, :, zigzag]
    if current_activation_mesh() is not None:  # ids travel, not the table (models.embedding)
        x_btd = embedding.lookup(params["embed"], tokens_bt, config.dtype)
    else:  # also the decode layouts' embedding objects
        x_btd = params["embed"][tokens_bt].astype(config.dtype)
    x_btd = constrain(x_btd, _RESIDUAL_AXES)
    cos, sin = rope_cos_sin(config, positions_bt)
    cache_meta, new_cache = None, None
    paged = cache is not None and "page_table_bp" in cache
    if paged:
        cache_meta = paged_attention.paged_meta(cache["page_table_bp"], positions_bt, segment_ids_bt)
    elif cache is not None:
        valid_bs, new_end = attn_lib.advance_cache_validity(cache, segment_ids_bt)
        cache_meta = {
            "end": cache["end"],
            "valid_bs": valid_bs,
            "mask_bts": attn_lib.cache_mask(valid_bs, cache["end"], tokens_bt.shape[1]),
        }
    per_layer_cache = cache is not None and isinstance(cache["k"], (list, tuple))
    new_k, new_v, stats_list, moe_done = [], [], [], 0
    for kind, first, count in config.layer_runs():
        routed = None
        if kind == "moe" and routed_experts is not None:
            routed, moe_done = routed_experts[moe_done : moe_done + count], moe_done + count
        stack = _run_params(config, params, kind, first, count)
        kv = None
        if cache is not None:
            kv = (
                (cache["k"], cache["v"])
                if count == config.num_layers
                else (cache["k"][first : first + count], cache["v"][first : first + count])
            )
        run = _unrolled_run if per_layer_cache or isinstance(stack, (list, tuple)) else _scan_run
        x_btd, (run_kv, stats) = run(
            config, kind, stack, x_btd, cos, sin, segment_ids_bt, kv, cache_meta, routed, adapter_rows_b
        )
        if cache is not None:
            new_k.append(run_kv[0])
            new_v.append(run_kv[1])
        if stats is not None:
            stats_list.append(stats)
    if cache is not None:
        if per_layer_cache:
            cat = lambda xs: tuple(layer for run in xs for layer in run)
        else:
            cat = (lambda xs: xs[0]) if len(new_k) == 1 else (lambda xs: jnp.concatenate(xs, axis=0))
        rest = dict(page_table_bp=cache["page_table_bp"]) if paged else dict(valid_bs=valid_bs, end=new_end)
        new_cache = dict(k=cat(new_k), v=cat(new_v), **rest)
    if zigzag is not None:
        x_btd = constrain(x_btd[:, np.argsort(zigzag)], _RESIDUAL_AXES)
    hidden_btd = constrain(rms_norm(x_btd, params["final_norm"], config.rms_norm_eps), _RESIDUAL_AXES)
    out = hidden_btd if return_hidden else lm_head(config, params, hidden_btd, adapter_rows_b)
    if not return_aux:
        return out, new_cache
    aux = {"router_aux_loss": router_aux_loss(config, stats_list) if stats_list else jnp.zeros((), jnp.float32)}
    if stats_list:
        aux["router"] = moe.router_counts(stats_list)
        experts_lbtk = jnp.concatenate([s["experts_btk"] for s in stats_list])
        aux["routed_experts"] = experts_lbtk if zigzag is None else experts_lbtk[:, :, np.argsort(zigzag)]
    return out, new_cache, aux


def _ring_order(config, length: int):
    """The zigzag token order when ring attention splits rows over a sequence axis, else None."""
    split = context_parallel.sequence_axis()
    if split is None or config.sequence_parallelism != "ring":
        return None
    context_parallel.check(config, length, split[1])
    return context_parallel.zigzag_order(length, split[1])


def positions_from_mask(attention_mask_bt) -> jnp.ndarray:
    """Hugging Face's convention: positions count real tokens only (cumsum(mask) - 1, clipped at 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt, axis=-1) - 1, 0).astype(jnp.int32)


def logits(config, params, input_ids, attention_mask=None) -> jax.Array:
    """[batch, length, vocab] float32 logits with transformers' semantics (left padding allowed)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    out, _ = _jit_forward(config, params, input_ids, positions_from_mask(attention_mask), attention_mask)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(config, params, tokens_bt, positions_bt, segment_ids_bt):
    return forward(config, params, tokens_bt, positions_bt, segment_ids_bt=segment_ids_bt)
