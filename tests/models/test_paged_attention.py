"""Paged attention equals dense softmax(QK^T)V on each row's contiguous keys/values (float64 reference, 1e-5 in
float32): random scattered page tables, ragged lengths, partly filled last pages, GQA, decode and causal chunks,
shared prefix pages after a fork; writes land where the table says; fixed shapes compile once."""

import functools
import types

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models.paged_attention import copy_pages, init_kv_pages, paged_attention, write_pages
from polaris_jax.sampling.pages import NULL_PAGE, PagePool

TOL = dict(rtol=1e-5, atol=1e-5)
_attend = jax.jit(paged_attention, static_argnames=("scale", "pages_per_block"))
_write = jax.jit(write_pages)
_copy = jax.jit(copy_pages)


def dense_attention(q_thd, k_skd, v_skd, query_positions_t, scale):
    """Plain softmax(QK^T)V of one row in float64: query j sees positions <= query_positions_t[j]; a query
    that sees nothing gives zeros."""
    if len(k_skd) == 0:
        return np.zeros(q_thd.shape)
    g = q_thd.shape[1] // k_skd.shape[1]
    k_shd, v_shd = (np.repeat(np.asarray(x, np.float64), g, axis=1) for x in (k_skd, v_skd))
    scores_hts = np.einsum("thd,shd->hts", np.asarray(q_thd, np.float64), k_shd) * scale
    visible_ts = np.arange(len(k_skd))[None, :] <= np.asarray(query_positions_t)[:, None]
    scores_hts = np.where(visible_ts[None], scores_hts, -np.inf)
    m_ht = np.max(scores_hts, axis=-1, keepdims=True)
    probs_hts = np.exp(scores_hts - np.where(np.isfinite(m_ht), m_ht, 0.0))
    probs_hts /= np.maximum(np.sum(probs_hts, axis=-1, keepdims=True), 1e-300)
    return np.einsum("hts,shd->thd", probs_hts, v_shd)


def scattered_cache(rng, lengths, *, page_size, max_pages, num_pages, kv_heads, head_dim):
    """Each row's contiguous K/V, and the same tokens placed into randomly chosen, shuffled pages.
    Every other position (unused pages, the tails of last pages, the null page) holds large garbage."""
    k_rows = [rng.standard_normal((n, kv_heads, head_dim)).astype(np.float32) for n in lengths]
    v_rows = [rng.standard_normal((n, kv_heads, head_dim)).astype(np.float32) for n in lengths]
    k_pages = 50 * rng.standard_normal((kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    v_pages = 50 * rng.standard_normal((kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    table_bp = np.full((len(lengths), max_pages), NULL_PAGE, np.int32)
    for b, n in enumerate(lengths):
        for i in range(-(-n // page_size)):
            table_bp[b, i] = free.pop()
        for s in range(n):
            page, offset = table_bp[b, s // page_size], s % page_size
            k_pages[:, page, offset], v_pages[:, page, offset] = k_rows[b][s], v_rows[b][s]
    return k_rows, v_rows, k_pages, v_pages, table_bp


@pytest.mark.parametrize("t", [1, 4], ids=["decode", "chunk"])
@pytest.mark.parametrize("kv_heads,groups,head_dim", [(2, 1, 64), (2, 3, 128), (1, 8, 64)])
def test_equals_dense_on_random_page_tables(kv_heads, groups, head_dim, t):
    rng = np.random.default_rng(kv_heads * 100 + groups * 10 + t)
    lengths = [1, 8, 13, 23]  # page_size 4: one token, two exactly full pages, partly filled last pages
    page_size, max_pages = 4, 7
    k_rows, v_rows, k_pages, v_pages, table_bp = scattered_cache(
        rng, lengths, page_size=page_size, max_pages=max_pages, num_pages=40, kv_heads=kv_heads, head_dim=head_dim
    )
    # The last t positions of each row (negative, i.e. padding queries, for the 1-token row when t > 1).
    positions_bt = np.array([[n - t + j for j in range(t)] for n in lengths], np.int32)
    q_bthd = rng.standard_normal((len(lengths), t, kv_heads * groups, head_dim)).astype(np.float32)
    scale = head_dim**-0.5
    attend = lambda lengths_b, block: np.asarray(
        _attend(q_bthd, k_pages, v_pages, table_bp, lengths_b, positions_bt, scale=scale, pages_per_block=block)
    )

    # Blocks of 2 pages (the table padded from 7 to 8): several online-softmax steps.
    out_bthd = attend(np.array(lengths, np.int32), 2)
    for b, n in enumerate(lengths):
        want = dense_attention(q_bthd[b], k_rows[b], v_rows[b], positions_bt[b], scale)
        np.testing.assert_allclose(out_bthd[b], want, **TOL, err_msg=f"row {b} (length {n})")
    if t > 1:
        np.testing.assert_array_equal(out_bthd[0, :-1], 0.0)  # padding queries see nothing
    # One block over the whole table (gather everything, one softmax) gives the same result.
    np.testing.assert_allclose(attend(np.array(lengths, np.int32), max_pages), out_bthd, **TOL)
    # Shorter lengths, same queries: positions at or past a row's length are masked, even for later queries.
    shorter_b = np.maximum(np.array(lengths, np.int32) - 2, 0)
    out_bthd = attend(shorter_b, 2)
    for b, n in enumerate(shorter_b):
        want = dense_attention(q_bthd[b], k_rows[b][:n], v_rows[b][:n], positions_bt[b], scale)
        np.testing.assert_allclose(out_bthd[b], want, **TOL, err_msg=f"row {b} (length {n})")


def test_reads_only_the_blocks_that_hold_tokens():
    """Pages reserved past every row's filled blocks (here full of NaN, which would poison the output if read)
    are never read: the blockwise loop stops at the longest row's last filled block, so decode cost follows
    the filled pages, not the table's width."""
    rng = np.random.default_rng(5)
    lengths, page_size, max_pages, num_pages, kv_heads, head_dim = [5, 3], 4, 8, 20, 1, 64
    k_rows, v_rows, k_pages, v_pages, table_bp = scattered_cache(
        rng,
        lengths,
        page_size=page_size,
        max_pages=max_pages,
        num_pages=num_pages,
        kv_heads=kv_heads,
        head_dim=head_dim,
    )
    spare = [p for p in range(1, num_pages) if p not in table_bp]
    for b in range(2):  # reserve the rest of each table; pages from slot 2 on (blocks 1-3 of 2 pages) hold NaN
        for slot in range(-(-lengths[b] // page_size), max_pages):
            table_bp[b, slot] = page = spare.pop()
            if slot >= 2:
                k_pages[:, page], v_pages[:, page] = np.nan, np.nan
    q_bthd = rng.standard_normal((2, 1, 2, head_dim)).astype(np.float32)
    positions_bt = np.array([[n - 1] for n in lengths], np.int32)
    out = np.asarray(
        _attend(
            q_bthd,
            k_pages,
            v_pages,
            table_bp,
            np.array(lengths, np.int32),
            positions_bt,
            scale=0.125,
            pages_per_block=2,
        )
    )
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[b], dense_attention(q_bthd[b], k_rows[b], v_rows[b], [n - 1], 0.125), **TOL)


def test_forked_rows_share_prefix_pages():
    """A prompt prefilled once (write_pages), forked with copy-on-write of its partial last page, then two
    different continuations: each row's attention equals dense attention over its own contiguous tokens."""
    rng = np.random.default_rng(7)
    kv_heads, groups, head_dim, page_size, num_pages, max_pages = 2, 3, 64, 4, 12, 5
    pool = PagePool(num_pages, page_size)
    k_pages = jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, head_dim)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, head_dim)), jnp.float32)
    prompt_k, prompt_v = (rng.standard_normal((10, kv_heads, head_dim)).astype(np.float32) for _ in range(2))

    pool.admit("parent", 10)
    table_1p = pool.page_table_array(["parent"], max_pages)
    k_pages, v_pages = _write(
        k_pages, v_pages, table_1p, np.arange(10, dtype=np.int32)[None], prompt_k[None], prompt_v[None]
    )
    copies = pool.fork("parent", "child")
    assert len(copies) == 1  # 10 tokens: 2 full pages shared, the third (2 of 4) copied
    src_c = np.array([c[0] for c in copies] + [NULL_PAGE], np.int32)  # padded to a fixed size
    dst_c = np.array([c[1] for c in copies] + [NULL_PAGE], np.int32)
    k_pages, v_pages = _copy(k_pages, v_pages, src_c, dst_c)

    # Each row decodes 3 tokens of its own (written as one chunk), then attends as a chunk and as a decode step.
    for seq_id in ("parent", "child"):
        pool.append(seq_id, 3)
    table_bp = pool.page_table_array(["parent", "child"], max_pages)
    assert table_bp[0, :2].tolist() == table_bp[1, :2].tolist() and table_bp[0, 2] != table_bp[1, 2]
    assert [pool.refcount(p) for p in table_bp[0, :2]] == [2, 2]
    new_k, new_v = (rng.standard_normal((2, 3, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    positions_bt = np.array([[10, 11, 12]] * 2, np.int32)
    k_pages, v_pages = _write(k_pages, v_pages, table_bp, positions_bt, new_k, new_v)
    lengths_b = pool.lengths_array(["parent", "child"])
    q_bthd = rng.standard_normal((2, 3, kv_heads * groups, head_dim)).astype(np.float32)
    scale = head_dim**-0.5
    chunk = np.asarray(_attend(q_bthd, k_pages, v_pages, table_bp, lengths_b, positions_bt, scale=scale))
    decode = np.asarray(
        _attend(q_bthd[:, -1:], k_pages, v_pages, table_bp, lengths_b, positions_bt[:, -1:], scale=scale)
    )
    for b in range(2):
        k_skd = np.concatenate([prompt_k, new_k[b]])
        v_skd = np.concatenate([prompt_v, new_v[b]])
        np.testing.assert_allclose(chunk[b], dense_attention(q_bthd[b], k_skd, v_skd, positions_bt[b], scale), **TOL)
        np.testing.assert_allclose(decode[b], dense_attention(q_bthd[b, -1:], k_skd, v_skd, [12], scale), **TOL)
    assert not np.allclose(chunk[0], chunk[1])  # the continuations differ, so the rows really are separate

    pool.free("parent")
    pool.free("child")
    pool.check_full()


def test_write_pages_places_tokens_and_drops_padding():
    """A ragged chunked prefill (padding at position -1) then one decode token per row; positions past the
    table and slots without pages (null entries) are dropped, so untouched pages keep their bytes."""
    rng = np.random.default_rng(3)
    kv_heads, head_dim, page_size, num_pages, max_pages = 1, 64, 4, 10, 3
    lengths = [7, 2, 0]  # the third slot is idle: no pages
    pool = PagePool(num_pages, page_size)
    for i, n in enumerate(lengths):
        pool.allocate(i, n)
    start_k = rng.standard_normal((kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    start_v = rng.standard_normal((kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    table_bp = pool.page_table_array([0, 1, 2], max_pages)
    k_btkd, v_btkd = (rng.standard_normal((3, 8, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    positions_bt = np.array([list(range(7)) + [-1], [0, 1] + [-1] * 6, [0, 1, 2, 3, 4, 5, 6, 7]], np.int32)
    k_pages, v_pages = _write(start_k, start_v, table_bp, positions_bt, k_btkd, v_btkd)
    k_pages, v_pages = np.asarray(k_pages), np.asarray(v_pages)
    held = {int(p) for p in table_bp[table_bp != NULL_PAGE]}
    for page in set(range(num_pages)) - held:  # incl. the null page the idle slot's writes pointed at
        np.testing.assert_array_equal(k_pages[:, page], start_k[:, page])
        np.testing.assert_array_equal(v_pages[:, page], start_v[:, page])
    for b, n in enumerate(lengths):
        for s in range(n):
            page, offset = table_bp[b, s // page_size], s % page_size
            np.testing.assert_array_equal(k_pages[:, page, offset], k_btkd[b, s])
            np.testing.assert_array_equal(v_pages[:, page, offset], v_btkd[b, s])

    # One decode token each for the live rows; row 0 writes past its 3-page table (position 12) too: dropped.
    pool.append(0, 1)
    pool.append(1, 1)
    table_bp = pool.page_table_array([0, 1, 2], max_pages)
    dec_k, dec_v = (rng.standard_normal((3, 2, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    dec_positions = np.array([[7, 12], [2, -1], [-1, -1]], np.int32)
    before_k = k_pages.copy()
    k_pages, v_pages = _write(k_pages, v_pages, table_bp, dec_positions, dec_k, dec_v)
    changed = np.argwhere(np.any(np.asarray(k_pages) != before_k, axis=(0, 3)))
    assert sorted(map(tuple, changed.tolist())) == sorted([(int(table_bp[0, 1]), 3), (int(table_bp[1, 0]), 2)])

    q_bthd = rng.standard_normal((3, 1, 2, head_dim)).astype(np.float32)  # 2 query heads on 1 kv head
    lengths_b = pool.lengths_array([0, 1, 2])
    out = np.asarray(_attend(q_bthd, k_pages, v_pages, table_bp, lengths_b, (lengths_b - 1)[:, None], scale=0.125))
    for b, (keys, values) in enumerate([(k_btkd[0, :7], v_btkd[0, :7]), (k_btkd[1, :2], v_btkd[1, :2])]):
        k_skd = np.concatenate([keys, dec_k[b, :1]])
        v_skd = np.concatenate([values, dec_v[b, :1]])
        np.testing.assert_allclose(out[b], dense_attention(q_bthd[b], k_skd, v_skd, [len(k_skd) - 1], 0.125), **TOL)
    np.testing.assert_array_equal(out[2], 0.0)  # the idle slot
    for seq_id in (0, 1, 2):
        pool.free(seq_id)
    pool.check_full()


_COMPILES = {"on": False, "events": []}


def _listen(name, duration, **kwargs):
    if _COMPILES["on"] and name == "/jax/core/compile/backend_compile_duration":
        _COMPILES["events"].append(kwargs.get("fun_name"))


jax.monitoring.register_event_duration_secs_listener(_listen)


def test_one_compilation_for_fixed_shapes():
    """A device step (write this step's tokens, attend) compiles once; new lengths, positions and page tables
    (values only) reuse it. Inputs are placed explicitly, and the step runs under transfer_guard('disallow')."""
    traces = []

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(k_pages, v_pages, table_bp, lengths_b, positions_bt, q_bthd, k_btkd, v_btkd):
        traces.append(1)
        k_pages, v_pages = write_pages(k_pages, v_pages, table_bp, positions_bt, k_btkd, v_btkd)
        out = paged_attention(
            q_bthd, k_pages, v_pages, table_bp, lengths_b, positions_bt, scale=0.125, pages_per_block=2
        )
        return k_pages, v_pages, out

    rng = np.random.default_rng(11)
    kv_heads, groups, head_dim, page_size, num_pages, max_pages = 2, 3, 64, 4, 24, 6
    pool = PagePool(num_pages, page_size)
    pages = [jax.device_put(np.zeros((kv_heads, num_pages, page_size, head_dim), np.float32)) for _ in range(2)]
    rows = ["a", "b", "c"]
    history = {r: ([], []) for r in rows}  # each row's contiguous keys and values, for the dense check

    def run(new_tokens):
        for r, n in zip(rows, new_tokens):
            if r in pool:
                pool.append(r, n)
            else:
                pool.allocate(r, n)
        table_bp, lengths_b = pool.page_table_array(rows, max_pages), pool.lengths_array(rows)
        positions_bt = np.full((3, 2), -1, np.int32)
        for b, n in enumerate(new_tokens):
            positions_bt[b, :n] = np.arange(lengths_b[b] - n, lengths_b[b])
        q, k, v = (rng.standard_normal((3, 2, kv_heads * g, head_dim)).astype(np.float32) for g in (groups, 1, 1))
        for b, r in enumerate(rows):
            history[r][0].extend(k[b, : new_tokens[b]])
            history[r][1].extend(v[b, : new_tokens[b]])
        args = jax.device_put((table_bp, lengths_b, positions_bt, q, k, v))
        with jax.transfer_guard("disallow"):
            pages[0], pages[1], out = step(pages[0], pages[1], *args)
        out = jax.device_get(out)
        for b, r in enumerate(rows):
            n = new_tokens[b]
            want = dense_attention(
                q[b, :n], np.stack(history[r][0]), np.stack(history[r][1]), positions_bt[b, :n], 0.125
            )
            np.testing.assert_allclose(out[b, :n], want, **TOL)

    _COMPILES["on"] = True
    try:
        run([2, 1, 2])
        first, _COMPILES["events"] = _COMPILES["events"], []
        for _ in range(4):  # new values only: more tokens, new pages (tables), different lengths
            run([int(x) for x in rng.integers(1, 3, size=3)])
    finally:
        _COMPILES["on"] = False
    assert len(first) == 1, first  # the listener sees compilations: the first call made exactly one
    assert len(traces) == 1 and _COMPILES["events"] == [], _COMPILES["events"]
    for r in rows:
        pool.free(r)
    pool.check_full()


def test_init_kv_pages_one_buffer_per_layer():
    config = types.SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16)
    kv = init_kv_pages(config, num_pages=9, page_size=4, dtype=jnp.float32)
    assert [x.shape for x in kv["k"] + kv["v"]] == [(2, 9, 4, 64)] * 6
    assert {x.dtype for x in kv["k"] + kv["v"]} == {jnp.dtype(jnp.float32)}
    assert init_kv_pages(config, 9, 4)["k"][0].dtype == jnp.bfloat16
