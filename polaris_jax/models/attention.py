"""Grouped-query attention over explicit masks, and the KV cache it reads and writes.

The cache is a plain dict pytree, passed in and returned (never held by a module):
  k, v:      [layers, batch, max_len, kv_heads, head_dim]
  valid_bs:  [batch, max_len] bool, True on slots that hold a real token
  end:       int32 scalar, the next slot to write (shared by the batch)

`init_cache(..., per_layer=True)` builds the decode layout instead: k and v are tuples with one
`HeadMajorKV` per layer, keys stored [batch, kv_heads, head_dim, max_len] and values
[batch, kv_heads, max_len, head_dim]. Both attention products are then plain batched matmuls over
(batch, kv_heads) with no transpose of the cache, and every layer is its own buffer, so a decode step
updates the cache in place and never copies a layer out of a stack (which XLA on CPU does).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a row with no visible key gives a uniform softmax instead of NaN


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadMajorKV:
    """One layer's cached keys [B, K, H, S] (`keys=True`) or values [B, K, S, H], in the decode layout."""

    data: jax.Array
    keys: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def length_axis(self) -> int:
        return 3 if self.keys else 2

    @property
    def dtype(self):
        return self.data.dtype

    def astype(self, dtype) -> HeadMajorKV:
        return dataclasses.replace(self, data=self.data.astype(dtype))

    def replace_data(self, data) -> HeadMajorKV:
        return dataclasses.replace(self, data=data)


def init_cache(config, batch: int, max_len: int, dtype=None, *, per_layer: bool = False) -> dict:
    dtype = dtype or config.dtype
    meta = dict(valid_bs=jnp.zeros((batch, max_len), bool), end=jnp.zeros((), jnp.int32))
    if per_layer:
        kv, h = config.num_kv_heads, config.head_dim
        return dict(
            k=tuple(HeadMajorKV(jnp.zeros((batch, kv, h, max_len), dtype), True) for _ in range(config.num_layers)),
            v=tuple(HeadMajorKV(jnp.zeros((batch, kv, max_len, h), dtype), False) for _ in range(config.num_layers)),
            **meta,
        )
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), **meta)


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
    """Softmax attention in float32 with GQA; returns [B, T, N, H] in q's dtype.

    k and v are [B, S, K, H] arrays, or `HeadMajorKV` layers of the decode cache."""
    if isinstance(k_bskh, HeadMajorKV):
        return _head_major_attention(q_btnh, k_bskh.data, v_bskh.data, mask_bts)
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    scores = jnp.where(mask_bts[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q_btnh.dtype)


def _head_major_attention(q_btnh, k_bkhs, v_bksh, mask_bts) -> jnp.ndarray:
    """`grouped_attention` over the decode layout, accumulating in float32.

    A single query token is computed as broadcast multiply-and-reduce in the cache's dtype with a
    float32 sum: on CPU that is one fused loop per product, where a batched dot of [groups x head_dim]
    matrices costs more in overhead and relayouts than in arithmetic, and a float32 copy of a bf16
    cache would be written at every step."""
    b, t, n, h = q_btnh.shape
    kv = k_bkhs.shape[1]
    q_bktgh = jnp.swapaxes(q_btnh.reshape(b, t, kv, n // kv, h), 1, 2) * jnp.asarray(h**-0.5, q_btnh.dtype)
    q_bktgh = q_bktgh.astype(k_bkhs.dtype)
    if t == 1:
        scores = jnp.sum(q_bktgh[:, :, 0, :, :, None] * k_bkhs[:, :, None], axis=3, dtype=jnp.float32)[:, :, :, None]
    else:
        scores = jnp.einsum("bktgh,bkhs->bkgts", q_bktgh.astype(jnp.float32), k_bkhs.astype(jnp.float32))
    scores = jnp.where(mask_bts[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    if t == 1:
        out = jnp.sum(probs[:, :, :, 0, :, None].astype(v_bksh.dtype) * v_bksh[:, :, None], axis=3, dtype=jnp.float32)[
            :, None
        ]
    else:
        out = jnp.einsum("bkgts,bksh->btkgh", probs, v_bksh.astype(jnp.float32))
    return out.reshape(b, t, n, h).astype(q_btnh.dtype)


def length_major(cache_layer) -> jnp.ndarray:
    """One layer's cached keys or values as [B, S, K, H], whichever layout holds them."""
    if not isinstance(cache_layer, HeadMajorKV):
        return cache_layer
    return jnp.transpose(cache_layer.data, (0, 3, 1, 2) if cache_layer.keys else (0, 2, 1, 3))


def _write_slots(cache, update, end, axis: int):
    """`dynamic_update_slice` at `end` along `axis`. 16-bit floats go through a uint16 view: XLA on CPU
    otherwise widens the whole bf16 cache to float32 and back at every write."""
    update = update.astype(cache.dtype)
    if jnp.dtype(cache.dtype).itemsize != 2 or not jnp.issubdtype(cache.dtype, jnp.floating):
        return jax.lax.dynamic_update_slice_in_dim(cache, update, end, axis=axis)
    as_bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
    written = jax.lax.dynamic_update_slice_in_dim(as_bits(cache), as_bits(update), end, axis=axis)
    return jax.lax.bitcast_convert_type(written, cache.dtype)


def write_cache_layer(k_cache_bskh, v_cache_bskh, k_btkh, v_btkh, end):
    """Writes this call's keys/values at slot `end` of one layer's cache (either layout)."""
    if isinstance(k_cache_bskh, HeadMajorKV):
        k_bkht, v_bkth = jnp.transpose(k_btkh, (0, 2, 3, 1)), jnp.transpose(v_btkh, (0, 2, 1, 3))
        return (
            k_cache_bskh.replace_data(_write_slots(k_cache_bskh.data, k_bkht, end, axis=3)),
            v_cache_bskh.replace_data(_write_slots(v_cache_bskh.data, v_bkth, end, axis=2)),
        )
    return _write_slots(k_cache_bskh, k_btkh, end, axis=1), _write_slots(v_cache_bskh, v_btkh, end, axis=1)


def advance_cache_validity(cache: dict, segment_ids_bt: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The cache's valid_bs after writing T tokens at `end` (0-segment tokens stay invalid), and the new end."""
    new_valid_bt = segment_ids_bt != 0
    valid_bs = jax.lax.dynamic_update_slice_in_dim(cache["valid_bs"], new_valid_bt, cache["end"], axis=1)
    return valid_bs, cache["end"] + segment_ids_bt.shape[1]
