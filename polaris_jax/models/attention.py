"""Grouped-query attention over explicit masks, and the KV cache it reads and writes.

The cache is a plain dict pytree, passed in and returned (never held by a module):
  k, v:      [layers, batch, max_len, kv_heads, head_dim]
  valid_bs:  [batch, max_len] bool, True on slots that hold a real token
  end:       int32 scalar, the next slot to write (shared by the batch)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a row with no visible key gives a uniform softmax instead of NaN


def init_cache(config, batch: int, max_len: int, dtype=None) -> dict:
    dtype = dtype or config.dtype
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                valid_bs=jnp.zeros((batch, max_len), bool), end=jnp.zeros((), jnp.int32))


def self_mask(segment_ids_bt: jnp.ndarray) -> jnp.ndarray:
    """[B, T, T] causal mask within equal, non-zero segments (0 = padding)."""
    t = segment_ids_bt.shape[1]
    causal_tt = jnp.tril(jnp.ones((t, t), bool))
    same_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return causal_tt[None] & same_btt & (segment_ids_bt[:, None, :] != 0)


def cache_mask(valid_bs: jnp.ndarray, end: jnp.ndarray, num_new: int) -> jnp.ndarray:
    """[B, T, S]: query t (written at slot end+t) sees valid slots at or before its own."""
    slots_s = jnp.arange(valid_bs.shape[1])
    query_slot_t = end + jnp.arange(num_new)
    return valid_bs[:, None, :] & (slots_s[None, None, :] <= query_slot_t[None, :, None])


def grouped_attention(q_btnh, k_bskh, v_bskh, mask_bts) -> jnp.ndarray:
    """Softmax attention in float32 with GQA; returns [B, T, N, H] in q's dtype."""
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask_bts[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q_btnh.dtype)


def write_cache_layer(k_cache_bskh, v_cache_bskh, k_btkh, v_btkh, end):
    """Writes this call's keys/values at slot `end` of one layer's cache."""
    k_cache_bskh = jax.lax.dynamic_update_slice_in_dim(k_cache_bskh, k_btkh.astype(k_cache_bskh.dtype), end, axis=1)
    v_cache_bskh = jax.lax.dynamic_update_slice_in_dim(v_cache_bskh, v_btkh.astype(v_cache_bskh.dtype), end, axis=1)
    return k_cache_bskh, v_cache_bskh


def advance_cache_validity(cache: dict, segment_ids_bt: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The cache's valid_bs after writing T tokens at `end` (0-segment tokens stay invalid), and the new end."""
    new_valid_bt = segment_ids_bt != 0
    valid_bs = jax.lax.dynamic_update_slice_in_dim(cache["valid_bs"], new_valid_bt, cache["end"], axis=1)
    return valid_bs, cache["end"] + segment_ids_bt.shape[1]
