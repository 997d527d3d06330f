"""Top-k routed SwiGLU experts (Qwen3-MoE), on one device or expert-parallel over a mesh.

Routing (fp32 router, softmax, top-k, optional renormalisation) runs in the ordinary SPMD program, or is
replayed from recorded expert ids (`routed_btk`, router replay). The experts run in one `shard_map` over
the whole mesh when tracing under `activation_sharding` (no global sort, no all-gather of routed rows):

- each device keeps its own tokens (batch over data/fsdp/expert, length over sequence, copies over tensor;
  rows the batch axes cannot split reach every EP device whole, and each dispatches 1/EP of them);
- it holds E/EP experts (EP = the mesh axes the rules give `experts`), their weights gathered along embed
  (FSDP) and split along mlp over tensor. The gather runs inside the shard_map along a new leading axis:
  XLA lays an all-gather out with the gathered dimension most major, and gathering embed in place pushes
  that layout onto a layer scan's stacked [L, ...] weights, which it then copies whole before the loop
  (every layer's weight shards held twice for the whole step);
- dropless (the default): with EP > 1 its (token, slot) pairs, sorted by expert, go into a send buffer of
  n·k rows per destination (every pair may go to one device), one all_to_all over the expert axes delivers
  them, the local experts run as grouped matmuls (models.grouped_matmul), a second all_to_all returns the
  results. Static shapes make the buffers EP times the routed pairs (benchmarks/moe.py).
  `moe_dispatch_tokens` = N > 0 bounds them: the device's tokens go in runs of N (a scan whose step is
  rematerialised, so the backward holds one run's buffers at a time, for one more forward of the experts);
  the results are the same, as every token's experts are;
- `moe_capacity_factor` = cf > 0 (GShard): each expert takes at most C = ceil(cf·n·k/E) pairs from each
  device, overflow dropped (`moe_dropped`); the [E, C] slots travel in one all_to_all each way and run
  as one batched matmul, so FLOPs and bytes are cf times those of the routed pairs.

The router weights combine each token's k results; tensor shards' partial sums over mlp are added by
one psum.

Backward is the same program transposed (all_to_all is its own transpose), so EP=4 equals EP=1 on
logits and gradients (tests/models/test_expert_parallel.py).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from polaris_jax.models import grouped_matmul
from polaris_jax.models.config import ConfigError
from polaris_jax.models.sharding import activation_sharding, current_activation_mesh, logical_to_spec

# Logical axes of each expert weight as stored (models.params, less the layer axis): the shard_map takes
# them so and `_gather_embed` makes embed whole inside it; mlp stays split over tensor.
_WEIGHT_AXES = {
    "gate": ("experts", "embed", "mlp"),
    "up": ("experts", "embed", "mlp"),
    "down": ("experts", "mlp", "embed"),
    # LoRA in Tinker's layout: the hidden-size factor shared by all experts, the other per expert.
    "gate_lora_a": ("embed", None),
    "up_lora_a": ("embed", None),
    "down_lora_a": ("experts", "mlp", None),
    "gate_lora_b": ("experts", None, "mlp"),
    "up_lora_b": ("experts", None, "mlp"),
    "down_lora_b": (None, "embed"),
}


def mesh_context(config, mesh, rules):
    """The context a sampler traces its forward in: with an expert axis an MoE model runs its experts
    expert-parallel over the mesh (read from the activation context). Otherwise XLA's own layout: in a
    decode loop the weights are loop-invariant, and gathering them for the experts' shard_map would be
    hoisted out of the loop, holding every layer's gathered experts at once."""
    if mesh is None or not config.is_moe or expert_axes(mesh, rules, config.num_experts)[1] == 1:
        return contextlib.nullcontext()
    return activation_sharding(mesh, rules)


def route(config, layer, x_btd, routed_btk=None):
    """(probs_bte fp32, top_w_btk fp32, top_e_btk int32). With `routed_btk` the experts are those ids and
    their weights the router's probabilities of them (router replay)."""
    logits_bte = jnp.einsum("btd,de->bte", x_btd.astype(jnp.float32), layer["router"].astype(jnp.float32))
    probs_bte = jax.nn.softmax(logits_bte, axis=-1)
    if routed_btk is None:
        top_w_btk, top_e_btk = jax.lax.top_k(probs_bte, config.num_experts_per_tok)
    else:  # -1: not recorded (e.g. a response's last token, never fed back while sampling): route as usual
        routed_btk = routed_btk.astype(jnp.int32)
        top_e_btk = jnp.where(routed_btk >= 0, routed_btk, jax.lax.top_k(probs_bte, config.num_experts_per_tok)[1])
        top_w_btk = jnp.take_along_axis(probs_bte, top_e_btk, axis=-1)
    if config.norm_topk_prob:
        top_w_btk = top_w_btk / jnp.sum(top_w_btk, axis=-1, keepdims=True)
    return probs_bte, top_w_btk, top_e_btk


def moe_block(config, layer, x_btd, token_mask_bt, routed_btk=None):
    """Returns (output [B, T, D], stats): router statistics for the load-balancing loss and the routing
    metrics (`router_counts`, `routing_metrics`), and `experts_btk`, the ids each token used."""
    probs_bte, top_w_btk, top_e_btk = route(config, layer, x_btd, routed_btk)
    experts = {name: layer[name] for name in _WEIGHT_AXES if name in layer}
    context = current_activation_mesh()
    if context is None:
        out_btd, dropped = _experts(config, (), 1, (), (), 1, x_btd, top_e_btk, top_w_btk, experts)
    else:
        out_btd, dropped = _sharded_experts(config, *context, x_btd, top_e_btk, top_w_btk, experts)
    m_n = token_mask_bt.reshape(-1).astype(jnp.float32)
    onehot_nke = jax.nn.one_hot(top_e_btk.reshape(m_n.shape[0], -1), config.num_experts, dtype=jnp.float32)
    stats = dict(
        dispatch_ke=jnp.einsum("nke,n->ke", onehot_nke, m_n),
        prob_e=jnp.einsum("ne,n->e", probs_bte.reshape(m_n.shape[0], -1), m_n),
        tokens=jnp.sum(m_n),
        dropped=dropped,
        pairs=jnp.asarray(top_e_btk.size, jnp.float32),
        experts_btk=top_e_btk,
    )
    return out_btd, stats


def router_counts(stats_list) -> dict:
    """Additive routing counts of a forward (sums over microbatches stay exact): per MoE layer and expert
    the (unpadded) tokens routed to it [L, E], and the routed pairs dropped over capacity and in all."""
    return dict(
        counts_le=jnp.concatenate([jnp.sum(s["dispatch_ke"], axis=1) for s in stats_list]),
        dropped=sum(jnp.sum(s["dropped"]) for s in stats_list),
        pairs=sum(jnp.sum(s["pairs"]) for s in stats_list),
    )


def routing_metrics(counts: dict) -> dict:
    """Tinker-style routing health from `router_counts`: the fraction of experts that got tokens, the
    max / min expert load relative to an even split, oversubscription (the share of pairs above their
    expert's even share) and the share of pairs dropped over capacity; means over MoE layers."""
    counts_le = counts["counts_le"]
    even_l1 = jnp.maximum(jnp.mean(counts_le, axis=1, keepdims=True), 1e-9)
    load_le = counts_le / even_l1
    total_l = jnp.maximum(jnp.sum(counts_le, axis=1), 1e-9)
    return {
        "moe_experts_used": jnp.mean(counts_le > 0),
        "moe_max_load": jnp.max(load_le),
        "moe_min_load": jnp.min(load_le),
        "moe_oversubscription": jnp.mean(jnp.sum(jnp.maximum(counts_le - even_l1, 0.0), axis=1) / total_l),
        "moe_dropped": counts["dropped"] / jnp.maximum(counts["pairs"], 1.0),
    }


def expert_axes(mesh, rules, num_experts: int) -> tuple[tuple[str, ...], int]:
    """(mesh axes, EP size) that the experts are split over; a ConfigError when EP does not divide them."""
    target = dict(rules).get("experts")
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
    ep = int(np.prod([mesh.shape[a] for a in names]))
    if num_experts % ep:
        raise ConfigError(
            f"expert parallelism over mesh axes {names} ({ep} devices) must divide num_experts={num_experts}; "
            f"choose an expert axis size that divides it"
        )
    return names, ep


def _sharded_experts(config, mesh, rules, x_btd, top_e_btk, top_w_btk, experts):
    ep_axes, ep = expert_axes(mesh, rules, config.num_experts)
    token_spec = logical_to_spec(("batch", "length", None), mesh, rules, x_btd.shape)
    weight_specs = {name: logical_to_spec(_WEIGHT_AXES[name], mesh, rules, w.shape) for name, w in experts.items()}
    embed_axes = {name: _embed_axes(_WEIGHT_AXES[name], spec) for name, spec in weight_specs.items()}
    tp_axes = _axes(weight_specs["gate"][2])
    token_axes = _axes(token_spec[0]) + _axes(token_spec[1])
    copies = mesh.size // int(np.prod([mesh.shape[a] for a in token_axes]))  # devices holding the same tokens
    split = dispatches_a_share(ep_axes, ep, token_spec)
    local = functools.partial(
        _experts, config, ep_axes, ep, tp_axes, tuple(mesh.axis_names), copies // (ep if split else 1)
    )
    local = functools.partial(_split_tokens, ep_axes, ep, local) if split else local
    fn = jax.shard_map(
        functools.partial(_gather_embed, embed_axes, local),
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, weight_specs),
        out_specs=(token_spec, PartitionSpec()),
        check_vma=False,
    )
    return fn(x_btd, top_e_btk, top_w_btk, experts)


def dispatches_a_share(ep_axes, ep: int, token_spec) -> bool:
    """Whether each EP device dispatches only 1/EP of its tokens: rows the batch axes cannot split over the
    expert axes (a decode bucket, a prefill chunk) reach every EP device whole, and the shares are
    all-gathered after. `token_spec`: the tokens' PartitionSpec, batch then length."""
    return ep > 1 and not set(ep_axes) & set(_axes(token_spec[0]) + _axes(token_spec[1]))


def _split_tokens(ep_axes, ep, experts_fn, x_btd, top_e_btk, top_w_btk, experts):
    """`experts_fn` over this device's 1/EP of tokens that every EP device holds, all-gathered after."""
    b, t, d = x_btd.shape
    n, k = b * t, top_e_btk.shape[-1]
    share = -(-n // ep)
    start = jax.lax.axis_index(ep_axes) * share
    take = lambda x: jax.lax.dynamic_slice_in_dim(jnp.pad(x, ((0, share * ep - n), (0, 0))), start, share)
    x_1sd = take(x_btd.reshape(n, d))[None]
    out, dropped = experts_fn(x_1sd, take(top_e_btk.reshape(n, k))[None], take(top_w_btk.reshape(n, k))[None], experts)
    out_nd = jax.lax.all_gather(out[0], ep_axes, tiled=True)[:n]
    return out_nd.reshape(b, t, d), dropped


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _embed_axes(axes, spec) -> tuple[int, tuple[str, ...]] | None:
    """(dimension, mesh axes) that split a weight's embed dimension, or None when it is whole."""
    if "embed" not in axes or not _axes(spec[axes.index("embed")]):
        return None
    return axes.index("embed"), _axes(spec[axes.index("embed")])


def _gather_embed(embed_axes, experts_fn, x_btd, top_e_btk, top_w_btk, experts):
    """`experts_fn` with this device's expert weights whole along embed: each weight's shards gathered along a
    new leading axis (the most major, so the stored weights keep their layout), then moved beside the rest."""
    whole = {}
    for name, w in experts.items():
        if embed_axes[name] is None:
            whole[name] = w
            continue
        dim, axes = embed_axes[name]
        shards = jax.lax.all_gather(w, axes, axis=0, tiled=False)  # [shards, ..., D / shards, ...]
        shape = w.shape[:dim] + (shards.shape[0] * w.shape[dim],) + w.shape[dim + 1 :]
        whole[name] = jnp.moveaxis(shards, 0, dim).reshape(shape)
    return experts_fn(x_btd, top_e_btk, top_w_btk, whole)


def _experts(config, ep_axes, ep, tp_axes, all_axes, copies, x_btd, top_e_btk, top_w_btk, experts):
    """One device's share: its tokens through their experts. Returns (output [b, t, D], dropped pairs)."""
    b, t, d = x_btd.shape
    n, k, run = b * t, config.num_experts_per_tok, config.moe_dispatch_tokens
    x_nd, top_e_nk, top_w_nk = x_btd.reshape(n, d), top_e_btk.reshape(n, k), top_w_btk.reshape(n, k)
    dispatch = functools.partial(_dispatch, config, ep_axes, ep, experts)
    if 0 < run < n:  # runs of `run` tokens; the padding tokens' weights are 0
        runs, pad = -(-n // run), -n % run
        as_runs = lambda a: jnp.pad(a, ((0, pad), (0, 0))).reshape(runs, run, a.shape[-1])
        step = jax.checkpoint(lambda carry, xs: (carry, dispatch(*xs)))
        _, (out_ind, dropped_i) = jax.lax.scan(step, None, (as_runs(x_nd), as_runs(top_e_nk), as_runs(top_w_nk)))
        out_nd, dropped = out_ind.reshape(runs * run, d)[:n], jnp.sum(dropped_i)
    else:
        out_nd, dropped = dispatch(x_nd, top_e_nk, top_w_nk)
    if tp_axes:
        out_nd = jax.lax.psum(out_nd, tp_axes)
    if all_axes:
        dropped = jax.lax.psum(dropped, all_axes) / copies
    return out_nd.astype(x_btd.dtype).reshape(b, t, d), dropped


def _dispatch(config, ep_axes, ep, experts, x_nd, top_e_nk, top_w_nk):
    """Tokens x_nd [n, D] through their experts (top_e_nk, weights top_w_nk): (float32 [n, D] partial sums
    over this device's mlp shard, dropped pairs)."""
    n, k = top_e_nk.shape
    expert_r = top_e_nk.reshape(-1)
    order_r = jnp.argsort(expert_r, stable=True)  # pairs grouped by expert, hence by destination
    rows_rd = x_nd[order_r // k]
    if config.moe_capacity_factor > 0:
        y_sorted_rd, dropped = _by_capacity(config, ep_axes, ep, experts, rows_rd, expert_r[order_r])
    elif ep == 1:
        group_sizes_e = jnp.bincount(expert_r, length=config.num_experts).astype(jnp.int32)
        y_sorted_rd = _grouped_mlp(config, experts, rows_rd, group_sizes_e)
        dropped = jnp.zeros((), jnp.float32)
    else:
        y_sorted_rd, dropped = _dropless_exchange(config, ep_axes, ep, experts, rows_rd, expert_r[order_r])
    y_rd = jnp.zeros_like(y_sorted_rd).at[order_r].set(y_sorted_rd, unique_indices=True)
    return jnp.einsum("nkd,nk->nd", y_rd.reshape(n, k, -1).astype(jnp.float32), top_w_nk), dropped


def _slots(sorted_group_r, groups: int, cap: int):
    """(slot of each sorted pair in a [groups, cap] buffer, out of range when its group is full; kept)."""
    counts_g = jnp.bincount(sorted_group_r, length=groups)
    position_r = jnp.arange(sorted_group_r.shape[0]) - (jnp.cumsum(counts_g) - counts_g)[sorted_group_r]
    kept_r = position_r < cap
    return jnp.where(kept_r, sorted_group_r * cap + position_r, groups * cap), kept_r


def _by_capacity(config, ep_axes, ep, experts, rows_rd, sorted_expert_r):
    """GShard dispatch: each expert takes at most C = ceil(capacity_factor * pairs / E) of this device's
    pairs; [E, C] slots go to the experts' devices in one all_to_all and run as one batched matmul."""
    rows, d = rows_rd.shape
    e, local_experts = config.num_experts, config.num_experts // ep
    cap = max(1, int(np.ceil(config.moe_capacity_factor * rows / e)))
    slot_r, kept_r = _slots(sorted_expert_r, e, cap)
    send = jnp.zeros((e * cap, d), rows_rd.dtype).at[slot_r].set(rows_rd, mode="drop", unique_indices=True)
    if ep > 1:  # [EP sources, local experts, C] -> [local experts, EP·C] and back
        exchange = functools.partial(jax.lax.all_to_all, axis_name=ep_axes, split_axis=0, concat_axis=0, tiled=True)
        x = exchange(send).reshape(ep, local_experts, cap, d).swapaxes(0, 1).reshape(e * cap, d)
        y = _swiglu(config, grouped_matmul.CapacityLayout(local_experts), experts, x)
        y = exchange(y.reshape(local_experts, ep, cap, d).swapaxes(0, 1).reshape(e * cap, d))
    else:
        y = _swiglu(config, grouped_matmul.CapacityLayout(e), experts, send)
    return y.at[slot_r].get(mode="fill", fill_value=0), jnp.sum(~kept_r).astype(jnp.float32)


def _dropless_exchange(config, ep_axes, ep, experts, rows_rd, sorted_expert_r):
    """Sends sorted pairs to their experts' devices and brings the results back (same order): C = all of
    this device's pairs per destination, so nothing is dropped whatever the routing."""
    rows, d = rows_rd.shape
    local_experts = config.num_experts // ep
    cap = rows
    dest_r = sorted_expert_r // local_experts
    slot_r, _ = _slots(dest_r, ep, cap)
    send_x = jnp.zeros((ep * cap, d), rows_rd.dtype).at[slot_r].set(rows_rd, mode="drop", unique_indices=True)
    send_e = jnp.full((ep * cap,), local_experts, jnp.int32)
    send_e = send_e.at[slot_r].set(sorted_expert_r % local_experts, mode="drop", unique_indices=True)
    exchange = functools.partial(jax.lax.all_to_all, axis_name=ep_axes, split_axis=0, concat_axis=0, tiled=True)
    recv_x, recv_e = exchange(send_x), exchange(send_e)  # [EP·C] rows from each source in turn
    order_s = jnp.argsort(recv_e, stable=True)  # empty slots (id local_experts) sort last
    group_sizes_e = jnp.bincount(recv_e, length=local_experts).astype(jnp.int32)
    y_sorted = _grouped_mlp(config, experts, recv_x[order_s], group_sizes_e)
    y_recv = jnp.zeros_like(y_sorted).at[order_s].set(y_sorted, unique_indices=True)
    back = exchange(y_recv)
    return back.at[slot_r].get(mode="fill", fill_value=0), jnp.zeros((), jnp.float32)


def _grouped_mlp(config, experts, rows_rd, group_sizes_e):
    """SwiGLU of rows sorted by (local) expert, `group_sizes_e` rows each; rows past their sum give zero."""
    mlp = lambda layout, x_rd: _swiglu(config, layout, experts, x_rd)
    return grouped_matmul.run(config.moe_matmul, mlp, rows_rd, group_sizes_e)


def _swiglu(config, layout, experts, x_rd):
    x = layout.enter(x_rd.astype(config.dtype))
    h = jax.nn.silu(_matmul(config, layout, experts, "gate", x)) * _matmul(config, layout, experts, "up", x)
    return layout.leave(_matmul(config, layout, experts, "down", h))


def _matmul(config, layout, experts, name, x):
    y = layout.matmul(x, experts[name])
    if name + "_lora_a" in experts:
        low = _factor_matmul(layout, x, experts[name + "_lora_a"])
        scale = config.lora_alpha / config.lora_rank
        y = y + (scale * _factor_matmul(layout, low, experts[name + "_lora_b"])).astype(y.dtype)
    return y


def _factor_matmul(layout, x, factor):
    """A LoRA factor: per expert ([E, in, out], grouped) or shared by every expert ([in, out], one matmul)."""
    if factor.ndim == 3:
        return layout.matmul(x, factor)
    return jnp.einsum("ri,io->ro", x, factor.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
