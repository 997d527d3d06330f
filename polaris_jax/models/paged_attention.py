"""Attention over a paged KV cache, in plain JAX: the reference that CPU runs and kernels are tested against.

Layout. Per layer, keys and values are each one array `[kv_heads, num_pages, page_size, head_dim]`
(suffix `_kpsd`), head-major. Token position i of row b sits in page `page_table_bp[b, i // page_size]`
at offset `i % page_size`; `lengths_b` counts the positions a row's pages hold. Head-major because:
- it is the layout of the Pallas paged-attention kernels in `jax.experimental.pallas.ops`
  (`gpu.paged_attention`, `tpu.paged_attention`: `[num_kv_heads, total_num_pages, page_size,
  head_dim]`), so the kernel chosen per backend can read the pool in place, with no per-step relayout
  (TPU's `ragged_paged_attention` wants token-major pages with K and V interleaved; adopting it means
  building the pool in that layout, not converting at each step);
- a gathered block of pages `[kv_heads, b, positions, head_dim]` is already in batched-matmul order
  for both products (batch axes kv_heads, b first; head_dim or positions last), as the decode cache's
  `HeadMajorKV` is, so the reference transposes only the small query block, never the cache;
- sharding kv heads over `tensor` splits the leading axis: each device holds whole pages of its heads.
Page 0 is the null page (`NULL_PAGE`, which `sampling.pages.PagePool` never hands out): table padding
points at it, writes aimed at it are dropped, and every position it stands for is masked.

Functions (all jittable, fixed shapes; lengths, positions and tables are traced values, so new values
never recompile):
- `write_pages`: scatters t new tokens per row into their pages. A negative position marks a padding
  token (not written); so does a position past the table or one whose page is the null page.
- `copy_pages`: the page copies `PagePool.fork` returns (copy-on-write of a partly filled last page).
- `paged_attention`: GQA attention of t query tokens per row against that row's pages. Query j of row
  b at position `query_positions_bt[b, j]` sees cache positions `s <= position` and `s < lengths_b[b]`:
  t = 1 is a decode step (position = length - 1, its own token written first); t > 1 is a chunk of a
  chunked prefill that attends to the cache before it and causally to itself. A query that sees no
  position (a padding query, position < 0) returns zeros. Scores and the softmax are float32.

Dtype. On CPU keep the pool float32, as `decode_loop` keeps its cache: a float32 (or uint16) write is
in place, but XLA CPU rewrites a whole 16-bit float pool at every scatter, viewed as uint16 or not (the
bitcast itself is materialised): 50-95 ms per write into a 64 MiB bf16 pool, 0.04 ms in float32 (jax 0.10).

Cost. Attention runs blockwise over the page table, `pages_per_block` pages at a time, with an online
(flash) softmax: a `while_loop` visits only the blocks that hold some row's tokens, so the work is
`b x` the longest row's filled pages rounded up to a block, never the table's full width
(`max_pages_per_seq`), and memory is one block of gathered pages per step. Rows shorter than the
longest pay for its blocks (masked), so a batch of many rows runs in groups of `rows_per_group`, each
with its own loop: the engine orders its decode rows by length, so a group's rows are alike and the
work is close to each row's own filled pages. (The Pallas kernels skip per row.) The
result equals one softmax over the gathered pages up to float32 rounding (the tests check 1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NULL_PAGE = 0  # reserved padding page: never allocated (sampling.pages), never written, always masked
DEFAULT_PAGES_PER_BLOCK = 8
DEFAULT_ROWS_PER_GROUP = 32  # rows that share one loop over blocks (see Cost)


def init_kv_pages(config, num_pages: int, page_size: int, dtype=None) -> dict:
    """Zeroed pages for every layer: dict(k=tuple, v=tuple) of `[kv_heads, num_pages, page_size, head_dim]`,
    one buffer per layer (so a step updates each layer in place, as the decode cache does)."""
    shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
    dtype = dtype or config.dtype
    return dict(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
    )


def _scatter_pages(pages_kpsd, index, values):
    """pages.at[index].set(values); 16-bit floats through a uint16 view: XLA on CPU otherwise scatters a
    bf16 pool through a float32 copy of the whole of it (free elsewhere: a bitcast)."""
    values = values.astype(pages_kpsd.dtype)
    if jnp.dtype(pages_kpsd.dtype).itemsize != 2 or not jnp.issubdtype(pages_kpsd.dtype, jnp.floating):
        return pages_kpsd.at[index].set(values, mode="drop")
    as_bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)  # noqa: E731
    written = as_bits(pages_kpsd).at[index].set(as_bits(values), mode="drop")
    return jax.lax.bitcast_convert_type(written, pages_kpsd.dtype)


def write_pages(k_pages_kpsd, v_pages_kpsd, page_table_bp, positions_bt, k_btkd, v_btkd):
    """Writes each row's t new keys/values at their positions; returns (k_pages, v_pages).

    Tokens at a negative position, a position past the page table, or one whose table entry is the
    null page are dropped (padding). Two rows must not write the same (page, offset): the pool's
    copy-on-write keeps every page that can still be written private to one row."""
    num_pages, page_size = k_pages_kpsd.shape[1:3]
    max_pages = page_table_bp.shape[1]
    slot_bt = positions_bt // page_size
    in_table_bt = (positions_bt >= 0) & (slot_bt < max_pages)
    page_bt = jnp.take_along_axis(page_table_bp, jnp.where(in_table_bt, slot_bt, 0), axis=1)
    write_bt = in_table_bt & (page_bt != NULL_PAGE)
    index = (slice(None), jnp.where(write_bt, page_bt, num_pages), positions_bt % page_size)  # num_pages: dropped
    return (
        _scatter_pages(k_pages_kpsd, index, jnp.moveaxis(k_btkd, 2, 0)),
        _scatter_pages(v_pages_kpsd, index, jnp.moveaxis(v_btkd, 2, 0)),
    )


def copy_pages(k_pages_kpsd, v_pages_kpsd, src_c, dst_c):
    """Copies page src_c[i] to dst_c[i] (every layer calls this); pairs with dst = NULL_PAGE are padding."""
    num_pages = k_pages_kpsd.shape[1]
    index = (slice(None), jnp.where(dst_c != NULL_PAGE, dst_c, num_pages))
    return (
        _scatter_pages(k_pages_kpsd, index, k_pages_kpsd[:, src_c]),
        _scatter_pages(v_pages_kpsd, index, v_pages_kpsd[:, src_c]),
    )


def paged_attention(
    q_bthd,
    k_pages_kpsd,
    v_pages_kpsd,
    page_table_bp,
    lengths_b,
    query_positions_bt,
    *,
    scale: float,
    pages_per_block: int = DEFAULT_PAGES_PER_BLOCK,
    rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
):
    """GQA attention of each row's t queries over its pages; returns [b, t, h, d] in q's dtype.

    Query head i reads kv head i // (h / kv_heads), as `models.attention.grouped_attention` does.
    With b a multiple of `rows_per_group` (> 1 group), the rows run in groups of that many (`lax.map`), each
    visiting only the blocks its own longest row fills."""
    b = q_bthd.shape[0]
    if not 0 < rows_per_group < b or b % rows_per_group:
        return _attend_rows(
            q_bthd, k_pages_kpsd, v_pages_kpsd, page_table_bp, lengths_b, query_positions_bt, scale, pages_per_block
        )
    groups = lambda x: x.reshape((b // rows_per_group, rows_per_group) + x.shape[1:])

    def one_group(xs):
        q, table, lengths, positions = xs
        return _attend_rows(q, k_pages_kpsd, v_pages_kpsd, table, lengths, positions, scale, pages_per_block)

    out = jax.lax.map(one_group, (groups(q_bthd), groups(page_table_bp), groups(lengths_b), groups(query_positions_bt)))
    return out.reshape(q_bthd.shape)


def _attend_rows(
    q_bthd, k_pages_kpsd, v_pages_kpsd, page_table_bp, lengths_b, query_positions_bt, scale, pages_per_block
):
    b, t, h, d = q_bthd.shape
    kv_heads, _, page_size, _ = k_pages_kpsd.shape
    if h % kv_heads:
        raise ValueError(f"{h} query heads are not a multiple of {kv_heads} kv heads")
    g = h // kv_heads
    block = max(1, min(pages_per_block, page_table_bp.shape[1]))
    num_blocks = -(-page_table_bp.shape[1] // block)
    table_bp = jnp.pad(
        page_table_bp, ((0, 0), (0, num_blocks * block - page_table_bp.shape[1])), constant_values=NULL_PAGE
    )
    block_tokens = block * page_size
    lengths_b = jnp.minimum(lengths_b, table_bp.shape[1] * page_size)
    q_btkgd = q_bthd.reshape(b, t, kv_heads, g, d)

    def visit(j, carry):
        m_kbgt, l_kbgt, acc_kbgtd = carry
        pages_bq = jax.lax.dynamic_slice_in_dim(table_bp, j * block, block, axis=1)
        k_kbsd = k_pages_kpsd[:, pages_bq].reshape(kv_heads, b, block_tokens, d)
        v_kbsd = v_pages_kpsd[:, pages_bq].reshape(kv_heads, b, block_tokens, d)
        positions_s = j * block_tokens + jnp.arange(block_tokens)
        visible_bts = (positions_s[None, None, :] < lengths_b[:, None, None]) & (
            positions_s[None, None, :] <= query_positions_bt[:, :, None]
        )
        scores_kbgts = jnp.einsum("btkgd,kbsd->kbgts", q_btkgd, k_kbsd, preferred_element_type=jnp.float32)
        scores_kbgts = jnp.where(visible_bts[None, :, None], scores_kbgts * scale, -jnp.inf)
        m_new_kbgt = jnp.maximum(m_kbgt, jnp.max(scores_kbgts, axis=-1))
        m_ref_kbgt = jnp.where(jnp.isfinite(m_new_kbgt), m_new_kbgt, 0.0)  # nothing seen yet: any finite value
        probs_kbgts = jnp.exp(scores_kbgts - m_ref_kbgt[..., None])
        rescale_kbgt = jnp.exp(m_kbgt - m_ref_kbgt)
        l_kbgt = l_kbgt * rescale_kbgt + jnp.sum(probs_kbgts, axis=-1)
        pv_kbgtd = jnp.einsum(
            "kbgts,kbsd->kbgtd", probs_kbgts.astype(v_kbsd.dtype), v_kbsd, preferred_element_type=jnp.float32
        )
        return m_new_kbgt, l_kbgt, acc_kbgtd * rescale_kbgt[..., None] + pv_kbgtd

    init = (
        jnp.full((kv_heads, b, g, t), -jnp.inf, jnp.float32),
        jnp.zeros((kv_heads, b, g, t), jnp.float32),
        jnp.zeros((kv_heads, b, g, t, d), jnp.float32),
    )
    filled_blocks = jnp.minimum((jnp.max(lengths_b, initial=0) + block_tokens - 1) // block_tokens, num_blocks)
    _, l_kbgt, acc_kbgtd = jax.lax.fori_loop(0, filled_blocks, visit, init)
    out_kbgtd = acc_kbgtd / jnp.where(l_kbgt > 0, l_kbgt, 1.0)[..., None]
    return jnp.transpose(out_kbgtd, (1, 3, 0, 2, 4)).reshape(b, t, h, d).astype(q_bthd.dtype)


def paged_meta(page_table_bp, positions_bt, segment_ids_bt) -> dict:
    """What every layer's paged attention needs: the table, each token's position (-1 for padding, segment
    id 0) and each row's length after this call's writes (one past its last real position)."""
    positions_bt = jnp.where(segment_ids_bt != 0, positions_bt, -1)
    return dict(
        page_table_bp=page_table_bp,
        positions_bt=positions_bt,
        lengths_b=jnp.max(positions_bt, axis=1, initial=-1) + 1,
    )
