"""Context parallelism: attention over rows whose tokens are split across a `sequence` mesh axis.

The logical axis `length` maps to the mesh axis `sequence` (a rule of the table in models.sharding), so
with sequence = SP > 1 every activation of a training forward holds T/SP tokens of each row per device.
Everything but attention is per token; attention is one of two schemes (`ModelConfig.sequence_parallelism`):

- "ulysses" (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all turns [T/SP tokens, all heads] into
  [all T tokens, heads/SP] before attention and back after it. SP must divide the query and key/value
  head counts (per tensor shard). Four all-to-alls of 1/SP of the activations per layer.
- "ring" (Ring Attention, Liu et al. 2023): keys and values go round the SP devices in SP - 1 ppermutes;
  each device attends its queries to the chunk it holds (models.flash_attention partials, combined by
  their log-sum-exp). Any head count. Load-balanced by the zigzag layout of Megatron-CP: device r holds
  chunks r and 2·SP-1-r of the row's 2·SP chunks, so every device has the same number of visible
  (query chunk, key chunk) pairs. `forward` (models.transformer) permutes tokens, positions and segment
  ids into that order at entry and the hidden states back before the final norm. A key chunk wholly
  after a query chunk is skipped (lax.cond); inside the diagonal chunk the kernel skips causal blocks.

Both are differentiable (the backward of all_to_all / ppermute is the reverse collective) and equal
attention on one device, up to float32 summation order (tests/models/test_context_parallel.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from polaris_jax.models import attention_kernels
from polaris_jax.models.config import ConfigError
from polaris_jax.models.flash_attention import flash_attention_with_lse
from polaris_jax.models.sharding import current_activation_mesh, logical_to_spec

_MASKED = -1e30


def sequence_axis(length: int | None = None) -> tuple[str, int] | None:
    """(mesh axis, size) that `length` is split over while tracing under `activation_sharding`, or None."""
    context = current_activation_mesh()
    if context is None:
        return None
    mesh, rules = context
    target = dict(rules).get("length")
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
    if not names:
        return None
    if len(names) > 1:
        raise ConfigError(f"the logical axis 'length' maps to mesh axes {names}; context parallelism takes one")
    return names[0], int(mesh.shape[names[0]])


def check(config, length: int, sp: int, heads_per_shard: int | None = None, kv_heads_per_shard: int | None = None):
    """A ConfigError naming the problem when SP cannot split rows of `length` tokens (or, for Ulysses, the heads)."""
    scheme = config.sequence_parallelism
    chunks = 2 * sp if scheme == "ring" else sp
    if length % chunks:
        raise ConfigError(
            f"sequence parallelism {scheme} over {sp} devices splits each row into {chunks} equal chunks, "
            f"but rows hold {length} tokens; make the row length (data.seq_len, or the packed row budget) "
            f"a multiple of {chunks}"
        )
    if scheme == "ulysses":
        heads = heads_per_shard if heads_per_shard is not None else config.num_heads
        kv_heads = kv_heads_per_shard if kv_heads_per_shard is not None else config.num_kv_heads
        if heads % sp or kv_heads % sp:
            raise ConfigError(
                f"Ulysses sequence parallelism over {sp} devices splits the heads, but each tensor shard holds "
                f"{heads} query and {kv_heads} key/value heads; use sequence_parallelism='ring' or a sequence "
                f"axis dividing both"
            )


def zigzag_order(length: int, sp: int) -> np.ndarray:
    """Token order of the ring layout: device r's shard holds chunks r and 2·SP-1-r of 2·SP."""
    chunk = length // (2 * sp)
    chunks = [c for r in range(sp) for c in (r, 2 * sp - 1 - r)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def _specs(q, k, mesh, rules):
    """shard_map specs of q/k/v [B, T, N|K, H] and segments [B, T]. Query heads follow the key/value
    heads' split, so the local heads keep their GQA grouping."""
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), mesh, rules, k.shape)
    q_spec = PartitionSpec(kv_spec[0], kv_spec[1], kv_spec[2], None)
    return q_spec, kv_spec, PartitionSpec(kv_spec[0], kv_spec[1])


def attention(config, q_btnh, k_btkh, v_btkh, segment_ids_bt):
    """Causal attention within segments, with T split over the sequence axis; same shapes as the inputs."""
    mesh, rules = current_activation_mesh()
    axis, sp = sequence_axis()
    q_spec, kv_spec, seg_spec = _specs(q_btnh, k_btkh, mesh, rules)
    heads_split = int(np.prod([mesh.shape[a] for a in np.atleast_1d(kv_spec[2] or ())]))
    check(config, q_btnh.shape[1], sp, config.num_heads // heads_split, config.num_kv_heads // heads_split)
    if kv_spec[1] != axis:
        raise ConfigError(f"the 'length' rule must map to {axis!r} alone to split rows; got {kv_spec[1]!r}")
    local = functools.partial(_ulysses if config.sequence_parallelism == "ulysses" else _ring, config, axis, sp)
    if config.sequence_parallelism == "ring" and config.remat_policy == "none":
        # The backward pass runs the ring again instead of keeping every key/value chunk that went round
        # (SP chunks = the whole row's K/V per layer: the split undone). Layer remat policies recompute them.
        local = jax.checkpoint(local)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,
    )
    return fn(q_btnh, k_btkh, v_btkh, segment_ids_bt)


def _ulysses(config, axis, sp, q, k, v, seg):
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=2, concat_axis=1, tiled=True)
    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    seg = jax.lax.all_gather(seg, axis, axis=1, tiled=True)
    out = attention_kernels.self_attention(config, q, k, v, seg, local=True)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def _ring(config, axis, sp, q, k, v, seg):
    chunk = q.shape[1] // 2
    rank = jax.lax.axis_index(axis)
    halves = lambda x: (x[:, :chunk], x[:, chunk:])
    starts = lambda r: (r * chunk, (2 * sp - 1 - r) * chunk)  # global first slot of each local chunk
    q_chunks, q_segs, q_starts = halves(q), halves(seg), starts(rank)
    blocks = dict(block_q=config.attention_block_q, block_kv=config.attention_block_kv)
    b, _, n, h = q.shape
    acc = [(jnp.zeros((b, chunk, n, h), jnp.float32), jnp.full((b, chunk, n), _MASKED, jnp.float32)) for _ in (0, 1)]

    def visible(q_c, k_c, v_c, q_seg, kv_seg, offset):
        out, lse = flash_attention_with_lse(q_c, k_c, v_c, q_seg, kv_seg, offset, **blocks)
        return out.astype(jnp.float32), lse

    def hidden(q_c, *_):  # a key chunk wholly after the query chunk
        return jnp.zeros(q_c.shape, jnp.float32), jnp.full(q_c.shape[:3], _MASKED, jnp.float32)

    for step in range(sp):
        kv_starts = starts((rank - step) % sp)
        for qi in (0, 1):
            for ki, (k_c, v_c, seg_c) in enumerate(zip(halves(k), halves(v), halves(seg))):
                offset = q_starts[qi] - kv_starts[ki]
                part = jax.lax.cond(offset >= 0, visible, hidden, q_chunks[qi], k_c, v_c, q_segs[qi], seg_c, offset)
                acc[qi] = _combine(acc[qi], part)
        if step < sp - 1:
            send = functools.partial(jax.lax.ppermute, axis_name=axis, perm=[(i, (i + 1) % sp) for i in range(sp)])
            k, v, seg = send(k), send(v), send(seg)
    return jnp.concatenate([out for out, _ in acc], axis=1).astype(q.dtype)


def _combine(acc, part):
    """Merges two softmax-attention partials over disjoint keys by their log-sum-exps."""
    (out_a, lse_a), (out_b, lse_b) = acc, part
    lse = jnp.logaddexp(lse_a, lse_b)
    weight_a, weight_b = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
    return out_a * weight_a + out_b * weight_b, lse
