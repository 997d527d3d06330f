"""The host-side page pool: bookkeeping, copy-on-write forks, admission, errors; every test ends with the pool full."""

import random

import numpy as np
import pytest

from polaris_jax.sampling.pages import NULL_PAGE, PagePool, PoolExhausted


@pytest.fixture
def pool():
    pool = PagePool(num_pages=17, page_size=4)  # 16 usable pages
    yield pool
    pool.check_full()  # every test ends with every page back in the free list


def test_allocate_append_free(pool):
    assert (pool.capacity, pool.num_free, pool.num_used) == (16, 16, 0)
    pages = pool.allocate("a", 6)  # 2 pages: 4 + 2 positions
    assert len(pages) == 2 and NULL_PAGE not in pages
    assert pool.page_table("a") == tuple(pages) and pool.length("a") == 6
    assert [pool.refcount(p) for p in pages] == [1, 1]
    assert pool.append("a", 2) == []  # fills the second page
    assert pool.pages_needed("a", 1) == 1
    (third,) = pool.append("a", 1)
    assert pool.length("a") == 9 and pool.page_table("a") == (*pages, third)
    assert pool.allocate("empty", 0) == [] and pool.length("empty") == 0
    assert (pool.num_free, pool.num_used) == (13, 3)
    assert sorted(pool.free("a")) == sorted([*pages, third])
    assert pool.free("empty") == []
    assert pool.refcount(third) == 0


def test_fork_shares_full_pages_and_copies_only_the_partial_last_page(pool):
    parent = pool.allocate("p", 10)  # pages: full, full, 2/4 filled
    copies = pool.fork("p", "c")
    child = pool.page_table("c")
    assert len(copies) == 1
    (src, dst) = copies[0]
    assert src == parent[2] and dst == child[2] and dst not in parent
    assert child[:2] == tuple(parent[:2])
    assert [pool.refcount(p) for p in parent] == [2, 2, 1]
    assert pool.refcount(dst) == 1 and pool.length("c") == 10
    assert pool.num_used == 4  # 3 + the one copied page, not 6

    # A second sample of the same prompt, and a fork of a sequence that fills its last page exactly.
    assert len(pool.fork("p", "c2")) == 1
    assert [pool.refcount(p) for p in parent[:2]] == [3, 3]
    pool.allocate("q", 8)
    assert pool.fork("q", "q1") == []  # nothing partial: everything shared
    assert all(pool.refcount(p) == 2 for p in pool.page_table("q"))

    # Both sides grow privately after a fork: the shared pages stay untouched.
    assert pool.append("p", 2) == [] and len(pool.append("c", 3)) == 1
    new_q, new_q1 = pool.append("q", 1), pool.append("q1", 1)
    assert len(new_q) == len(new_q1) == 1 and new_q != new_q1

    # Freeing the parent first leaves the children whole; the last holder returns the page.
    pool.free("p")
    assert [pool.refcount(p) for p in parent] == [2, 2, 0]
    pool.free("c")
    assert [pool.refcount(p) for p in parent[:2]] == [1, 1]
    pool.free("c2")
    pool.free("q")
    pool.free("q1")
    pool.check_full()


def test_fork_of_an_empty_sequence_copies_nothing(pool):
    pool.allocate("p", 0)
    assert pool.fork("p", "c") == [] and pool.page_table("c") == ()
    pool.free("c")
    pool.free("p")


def test_admission_needs_the_prompt_plus_one_page(pool):
    assert pool.can_admit(60)  # 15 pages + 1
    assert not pool.can_admit(61)  # 16 pages + 1 > 16
    with pytest.raises(PoolExhausted, match=r"sequence 'big'.*61 tokens.*must wait"):
        pool.admit("big", 61)
    assert pool.num_free == 16 and "big" not in pool
    pool.admit("ok", 60)
    assert pool.num_free == 1
    assert not pool.can_admit(1)  # one page free: a 1-token prompt plus a page does not fit
    with pytest.raises(PoolExhausted, match="'late'"):
        pool.admit("late", 1)
    pool.free("ok")


def test_running_out_changes_nothing(pool):
    pool.allocate("a", 60)  # 15 pages
    with pytest.raises(PoolExhausted, match=r"sequence 'b': allocating 8 tokens needs 2 free pages"):
        pool.allocate("b", 8)
    assert "b" not in pool and pool.num_free == 1
    pool.append("a", 4)  # takes the last page
    with pytest.raises(PoolExhausted, match="sequence 'a': appending 1 tokens"):
        pool.append("a", 1)
    assert pool.length("a") == 64
    pool.free("a")
    pool.allocate("p", 63)  # 16 pages, the last one partial
    with pytest.raises(PoolExhausted, match=r"sequence 'c': forking 'p'"):
        pool.fork("p", "c")
    assert "c" not in pool and all(pool.refcount(p) == 1 for p in pool.page_table("p"))
    pool.free("p")


def test_errors_name_the_sequence(pool):
    pool.allocate(("req", 3), 5)
    with pytest.raises(ValueError, match=r"sequence \('req', 3\) already holds pages"):
        pool.allocate(("req", 3), 1)
    with pytest.raises(ValueError, match=r"sequence 'nobody' holds no pages"):
        pool.fork("nobody", "child")
    with pytest.raises(ValueError, match=r"sequence \('req', 3\) already holds pages"):
        pool.fork(("req", 3), ("req", 3))
    with pytest.raises(ValueError, match=r"sequence 'ghost' holds no pages"):
        pool.append("ghost", 1)
    with pytest.raises(ValueError, match=r"sequence 'neg': num_tokens=-1"):
        pool.allocate("neg", -1)
    with pytest.raises(ValueError, match=r"sequence \('req', 3\): new_tokens=2.5"):
        pool.append(("req", 3), 2.5)
    with pytest.raises(ValueError, match=r"sequence 'ghost' holds no pages"):
        pool.page_table_array(["ghost"], 4)
    with pytest.raises(ValueError, match=r"sequence \('req', 3\) holds 2 pages, more than max_pages=1"):
        pool.page_table_array([("req", 3)], 1)
    with pytest.raises(ValueError, match="not hashable"):
        pool.allocate(["a", "list"], 1)
    pool.free(("req", 3))
    with pytest.raises(ValueError, match=r"sequence \('req', 3\) holds no pages: .*already freed"):
        pool.free(("req", 3))


def test_device_arrays(pool):
    a = pool.allocate("a", 9)
    b = pool.allocate("b", 1)
    table_bp = pool.page_table_array(["b", None, "a"], max_pages=4)
    assert table_bp.dtype == np.int32 and table_bp.shape == (3, 4)
    np.testing.assert_array_equal(table_bp, [[*b, 0, 0, 0], [0, 0, 0, 0], [*a, 0]])
    lengths_b = pool.lengths_array(["b", None, "a"])
    assert lengths_b.dtype == np.int32 and lengths_b.tolist() == [1, 0, 9]
    pool.free("a")
    pool.free("b")


def test_check_full_reports_what_is_held():
    pool = PagePool(num_pages=5, page_size=2)
    pool.allocate("leak", 3)
    with pytest.raises(AssertionError, match=r"sequences still hold pages: 'leak'; 2 pages missing"):
        pool.check_full()
    pool.free("leak")
    pool.check_full()
    with pytest.raises(ValueError, match="num_pages=1"):
        PagePool(num_pages=1, page_size=2)


def _check_invariants(pool: PagePool, tokens: dict, content: np.ndarray):
    """Counts equal the tables holding each page, free and held pages partition the pool, each table has
    exactly the pages its length needs, and reading a sequence through its table gives its tokens."""
    held = np.zeros(pool.num_pages, np.int32)
    for seq_id, expected in tokens.items():
        table = pool.page_table(seq_id)
        assert pool.length(seq_id) == len(expected)
        assert len(table) == pool.pages_for(len(expected))
        np.add.at(held, list(table), 1)
        read = content[list(table)].reshape(-1)[: len(expected)] if table else []
        assert list(read) == expected, seq_id
        if len(expected) % pool.page_size:
            assert pool.refcount(table[-1]) == 1, f"{seq_id}'s writable last page is shared"
    assert [pool.refcount(p) for p in range(pool.num_pages)] == held.tolist()
    assert held[NULL_PAGE] == 0
    assert pool.num_free == int(np.sum(held[1:] == 0))


def test_random_operations_against_a_model():
    """Seeded random admit / append / fork / free, with a fake device that holds one token id per position
    (written through the page tables, page copies applied as `fork` returns them): every sequence reads
    back exactly its own tokens, so no shared page is ever written, and the pool ends full."""
    rng = random.Random(0)
    pool = PagePool(num_pages=41, page_size=4)
    content = np.full((pool.num_pages, pool.page_size), -1, np.int64)
    tokens: dict = {}
    next_id, next_token = 0, 0

    def write(seq_id, start):
        nonlocal next_token
        table = pool.page_table(seq_id)
        for i in range(start, pool.length(seq_id)):
            tokens[seq_id].append(next_token)
            content[table[i // pool.page_size], i % pool.page_size] = next_token
            next_token += 1

    for _ in range(3000):
        op = rng.choice(["admit", "append", "append", "fork", "free"])
        live = list(tokens)
        try:
            if op == "admit" or not live:
                n = rng.randint(0, 20)
                if not pool.can_admit(n):
                    with pytest.raises(PoolExhausted):
                        pool.admit(next_id, n)
                    continue
                pool.admit(next_id, n)
                tokens[next_id] = []
                write(next_id, 0)
                next_id += 1
            elif op == "append":
                seq_id = rng.choice(live)
                start = pool.length(seq_id)
                pool.append(seq_id, rng.randint(0, 6))
                write(seq_id, start)
            elif op == "fork":
                parent = rng.choice(live)
                for src, dst in pool.fork(parent, next_id):
                    content[dst] = content[src]
                tokens[next_id] = list(tokens[parent])
                next_id += 1
            else:
                seq_id = rng.choice(live)
                pool.free(seq_id)
                del tokens[seq_id]
        except PoolExhausted:
            pass  # the pool is unchanged (the invariants below check it)
        _check_invariants(pool, tokens, content)
    assert next_id > 100
    for seq_id in list(tokens):
        pool.free(seq_id)
    pool.check_full()
