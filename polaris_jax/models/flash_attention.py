"""Blockwise (flash) attention in plain JAX: O(T·block) memory instead of the dense [T, S] scores.

Dense attention materialises every layer's [B, heads, T, S] float32 scores, and keeps them for the
backward pass: about 64 GiB per row and layer at T = S = 32K with 16 heads. Here the queries run in
blocks of `block_q` and, for each, the keys and values in blocks of `block_kv` with an online softmax
(FlashAttention, Dao et al. 2022). The backward pass is FlashAttention-2's: it keeps only the output and
the per-query log-sum-exp, and recomputes each block's probabilities.

The mask is never materialised either. Query t (at slot t + q_offset) sees key slot s when
    s <= t + q_offset  and  q_segment[t] == kv_segment[s] != 0.
Training passes the packing segment ids on both sides with q_offset 0; prefill over a cache passes
q_segment = 1 and kv_segment = the cache's validity with q_offset = the cache's write slot. Key blocks
entirely after a query block's last slot are skipped (the loops' trip counts are dynamic), so causal
attention costs about half of the dense products.

A query that sees no key (padding) gets a uniform average, as in the dense path; its output is
meaningless in both and the losses mask it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASKED = -1e30  # the dense path's masked score, so padded rows agree


def _blocks(x, axis: int, block: int, value=0):
    """Pads `axis` to a multiple of `block` and splits it into [num_blocks, block]."""
    size = x.shape[axis]
    padded = -(-size // block) * block
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padded - size)
    x = jnp.pad(x, widths, constant_values=value)
    return x.reshape(x.shape[:axis] + (padded // block, block) + x.shape[axis + 1 :])


def _block_mask(q_seg_bq, kv_seg_bk, q_slot_q, kv_slot_k):
    """[B, 1, 1, bq, bk] visibility of one (query block, key block) pair."""
    visible = (
        (kv_slot_k[None, None, :] <= q_slot_q[None, :, None])
        & (q_seg_bq[:, :, None] == kv_seg_bk[:, None, :])
        & (kv_seg_bk[:, None, :] != 0)
    )
    return visible[:, None, None]


def _last_kv_block(i, q_offset, block_q: int, block_kv: int, num_kv: int):
    """One past the last key block that query block i can see (causal)."""
    return jnp.minimum(num_kv, (q_offset + (i + 1) * block_q - 1) // block_kv + 1)


def _first_q_block(j, q_offset, block_q: int, block_kv: int, num_q: int):
    """The first query block that can see key block j (causal)."""
    return jnp.clip((j * block_kv - q_offset) // block_q, 0, num_q)


def _scores(q_bqkgh, k_bskh, mask, scale):
    s_bkgqs = jnp.einsum("bqkgh,bskh->bkgqs", q_bqkgh, k_bskh, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, s_bkgqs, _MASKED)


def _forward(q_bnqkgh, k_bnskh, v_bnskh, q_seg_bnq, kv_seg_bns, q_offset, block_q, block_kv):
    """Returns out [B, nq, bq, K, G, H] (q's dtype) and lse [B, nq, K, G, bq] (float32)."""
    b, num_q, _, kv, g, h = q_bnqkgh.shape
    num_kv = k_bnskh.shape[1]
    scale = h**-0.5

    def query_block(i, carry):
        out, lse = carry
        q_i, seg_i = q_bnqkgh[:, i], q_seg_bnq[:, i]
        q_slot = q_offset + i * block_q + jnp.arange(block_q)

        def key_block(j, acc):
            m, l, o = acc
            mask = _block_mask(seg_i, kv_seg_bns[:, j], q_slot, j * block_kv + jnp.arange(block_kv))
            s = _scores(q_i, k_bnskh[:, j], mask, scale)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            o = o * correction[..., None] + jnp.einsum(
                "bkgqs,bskh->bkgqh", p.astype(v_bnskh.dtype), v_bnskh[:, j], preferred_element_type=jnp.float32
            )
            return m_new, l * correction + jnp.sum(p, axis=-1), o

        init = (
            jnp.full((b, kv, g, block_q), _MASKED, jnp.float32),
            jnp.zeros((b, kv, g, block_q), jnp.float32),
            jnp.zeros((b, kv, g, block_q, h), jnp.float32),
        )
        hi = _last_kv_block(i, q_offset, block_q, block_kv, num_kv)
        m, l, o = jax.lax.fori_loop(0, hi, key_block, init)
        l = jnp.where(l > 0, l, 1.0)  # no key block visited (a negative q_offset): out 0, lse -1e30
        o_bqkgh = jnp.transpose(o / l[..., None], (0, 3, 1, 2, 4)).astype(out.dtype)
        out = jax.lax.dynamic_update_index_in_dim(out, o_bqkgh, i, axis=1)
        return out, jax.lax.dynamic_update_index_in_dim(lse, m + jnp.log(l), i, axis=1)

    init = (jnp.zeros_like(q_bnqkgh), jnp.zeros((b, num_q, kv, g, block_q), jnp.float32))
    return jax.lax.fori_loop(0, num_q, query_block, init)


def _backward(block_q, block_kv, residuals, d_out, d_lse=None):
    q_bnqkgh, k_bnskh, v_bnskh, q_seg_bnq, kv_seg_bns, q_offset, out, lse = residuals
    num_q, num_kv, h = q_bnqkgh.shape[1], k_bnskh.shape[1], q_bnqkgh.shape[-1]
    scale = h**-0.5
    # delta = rowsum(dO ∘ O), the softmax backward's per-query term, as [B, nq, K, G, bq]. A cotangent on
    # the log-sum-exp (d lse / d s = p) enters as -d_lse, since ds = p * (dp - delta).
    delta = jnp.einsum("bnqkgh,bnqkgh->bnkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    if d_lse is not None:
        delta = delta - d_lse

    def key_block(j, carry):
        dq, dk, dv = carry
        k_j, v_j, kv_seg_j = k_bnskh[:, j], v_bnskh[:, j], kv_seg_bns[:, j]
        kv_slot = j * block_kv + jnp.arange(block_kv)

        def query_block(i, acc):
            dq, dk_j, dv_j = acc
            q_i, do_i = q_bnqkgh[:, i], d_out[:, i]
            mask = _block_mask(q_seg_bnq[:, i], kv_seg_j, q_offset + i * block_q + jnp.arange(block_q), kv_slot)
            p = jnp.exp(_scores(q_i, k_j, mask, scale) - lse[:, i][..., None])
            dv_j = dv_j + jnp.einsum(
                "bkgqs,bqkgh->bskh", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bqkgh,bskh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[:, i][..., None]) * scale
            dk_j = dk_j + jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(q_i.dtype), q_i, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_index_in_dim(dq, dq[:, i] + dq_i, i, axis=1)
            return dq, dk_j, dv_j

        lo = _first_q_block(j, q_offset, block_q, block_kv, num_q)
        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(lo, num_q, query_block, (dq, zeros, zeros))
        return (
            dq,
            jax.lax.dynamic_update_index_in_dim(dk, dk_j.astype(dk.dtype), j, axis=1),
            jax.lax.dynamic_update_index_in_dim(dv, dv_j.astype(dv.dtype), j, axis=1),
        )

    init = (jnp.zeros(q_bnqkgh.shape, jnp.float32), jnp.zeros_like(k_bnskh), jnp.zeros_like(v_bnskh))
    dq, dk, dv = jax.lax.fori_loop(0, num_kv, key_block, init)
    return dq.astype(q_bnqkgh.dtype), dk, dv, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _blockwise(q, k, v, q_seg, kv_seg, q_offset, block_q, block_kv):
    return _forward(q, k, v, q_seg, kv_seg, q_offset, block_q, block_kv)[0]


def _blockwise_fwd(q, k, v, q_seg, kv_seg, q_offset, block_q, block_kv):
    out, lse = _forward(q, k, v, q_seg, kv_seg, q_offset, block_q, block_kv)
    return out, (q, k, v, q_seg, kv_seg, q_offset, out, lse)


_blockwise.defvjp(_blockwise_fwd, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _blockwise_with_lse(q, k, v, q_seg, kv_seg, q_offset, block_q, block_kv):
    return _forward(q, k, v, q_seg, kv_seg, q_offset, block_q, block_kv)


def _blockwise_with_lse_fwd(q, k, v, q_seg, kv_seg, q_offset, block_q, block_kv):
    out, lse = _forward(q, k, v, q_seg, kv_seg, q_offset, block_q, block_kv)
    return (out, lse), (q, k, v, q_seg, kv_seg, q_offset, out, lse)


def _blockwise_with_lse_bwd(block_q, block_kv, residuals, cotangents):
    d_out, d_lse = cotangents
    return _backward(block_q, block_kv, residuals, d_out, d_lse)


_blockwise_with_lse.defvjp(_blockwise_with_lse_fwd, _blockwise_with_lse_bwd)


def flash_attention(
    q_btnh, k_bskh, v_bskh, q_segment_bt, kv_segment_bs, q_offset=0, *, block_q: int = 512, block_kv: int = 512
) -> jnp.ndarray:
    """Grouped-query attention [B, T, N, H] (q's dtype) over keys/values [B, S, K, H], blockwise.

    Same result as `attention.grouped_attention` under the mask described in the module docstring,
    within float32 rounding; differentiable in q, k and v with O(T·block) memory."""
    return _attend(q_btnh, k_bskh, v_bskh, q_segment_bt, kv_segment_bs, q_offset, block_q, block_kv, False)


def flash_attention_with_lse(
    q_btnh, k_bskh, v_bskh, q_segment_bt, kv_segment_bs, q_offset=0, *, block_q: int = 512, block_kv: int = 512
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`flash_attention` plus each query's float32 log-sum-exp of scores [B, T, N], both differentiable:
    partial results over disjoint key sets combine exactly (ring attention, `models.context_parallel`).
    q_offset may be negative; a query that sees none of these keys gets lse about -1e30."""
    return _attend(q_btnh, k_bskh, v_bskh, q_segment_bt, kv_segment_bs, q_offset, block_q, block_kv, True)


def _attend(q_btnh, k_bskh, v_bskh, q_segment_bt, kv_segment_bs, q_offset, block_q, block_kv, with_lse):
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    block_q, block_kv = min(block_q, t), min(block_kv, k_bskh.shape[1])
    q = _blocks(q_btnh.reshape(b, t, kv, n // kv, h), 1, block_q)
    k, v = _blocks(k_bskh, 1, block_kv), _blocks(v_bskh.astype(k_bskh.dtype), 1, block_kv)
    q_seg = _blocks(q_segment_bt.astype(jnp.int32), 1, block_q)
    kv_seg = _blocks(kv_segment_bs.astype(jnp.int32), 1, block_kv)
    args = (q, k, v, q_seg, kv_seg, jnp.asarray(q_offset, jnp.int32), block_q, block_kv)
    if not with_lse:
        return _blockwise(*args).reshape(b, -1, n, h)[:, :t]
    out, lse_bnkgq = _blockwise_with_lse(*args)
    lse_btn = jnp.transpose(lse_bnkgq, (0, 1, 4, 2, 3)).reshape(b, -1, n)[:, :t]
    return out.reshape(b, -1, n, h)[:, :t], lse_btn
