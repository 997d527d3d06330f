"""The host-side page pool: the one owner of KV-cache memory for the continuous-batching engine.

Plain Python and numpy, no JAX. The device holds, per layer, `num_pages` pages of `page_size` token
positions (`models.paged_attention.init_kv_pages`); this pool decides which sequence owns which page. A
sequence (one decode slot's row: a prompt, or one of its n samples) has a page table, the list of
its pages in position order, and a length, the tokens its pages hold. Token position i of a
sequence lives in page `table[i // page_size]` at offset `i % page_size`.

    pool = PagePool(num_pages=1024, page_size=16)
    if pool.can_admit(len(prompt)):                    # else the request waits
        pool.admit(("req", 0), len(prompt))            # prefill writes the prompt into these pages
        copies = [pool.fork(("req", 0), ("req", j)) for j in range(1, n)]   # n samples share it
        # the device copies each (src, dst) page (models.paged_attention.copy_pages) before any decode write
    pool.append(seq, 1)                                # one more decoded token; a new page when needed
    pool.free(seq)                                     # when the row finishes or is aborted
    table_bp = pool.page_table_array(slots, max_pages) # int32, NULL_PAGE where a slot has no page
    lengths_b = pool.lengths_array(slots)

Design (after vLLM's `v1/core/block_pool.py` and `kv_cache_manager.py`, and Levanter's
`GenState.clone_sequence`):

- Null page. Page 0 (`NULL_PAGE`) is reserved and never handed out: page tables are padded with it,
  `models.paged_attention.write_pages` drops any write aimed at it, and attention masks every position it
  stands for. The pool's capacity is therefore `num_pages - 1`. An idle slot's table is all null,
  so a stale slot can neither read another sequence's tokens nor overwrite them.
- Reference counts. Every page has a count of the page tables holding it; a page returns to the
  free list when its count reaches 0. The free list is FIFO (a freed page is reused last), as in
  vLLM, which keeps a use-after-free from reading back the same bytes by luck.
- Copy-on-write of a shared prefix (`fork`). The child shares the parent's *full* pages (count + 1)
  and gets a private copy of the partly filled last page only; `fork` returns that (src, dst) copy
  for the device. The invariant that makes sharing safe: a page that a future write can land in
  (the page holding position `length`) is always private. Full pages are never written again, and
  the partial last page is private by construction, so nothing needs copying later.
- All-or-nothing. An operation that needs more pages than are free raises `PoolExhausted` (naming
  the sequence) and changes nothing. `can_admit` asks for the prompt plus one page of headroom
  (the first decode tokens), so an admitted request can always take at least one decode step;
  a request that cannot fit waits. Nothing is silently truncated.

What the pool does not do (the scheduler's job): choose slots, decide admission order, preempt
(free a victim and re-prefill it later from its tokens), or cache prefixes across requests.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence

import numpy as np

from polaris_jax.models.paged_attention import NULL_PAGE


class PoolExhausted(RuntimeError):
    """Raised when an operation needs more free pages than the pool has; the pool is unchanged."""


def _check_count(seq_id, name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"sequence {seq_id!r}: {name}={value!r} must be a non-negative integer")
    return int(value)


class PagePool:
    """Free list, reference counts and per-sequence page tables over `num_pages` pages (page 0 is null)."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} must be >= 2 (page {NULL_PAGE} is the reserved null page)")
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self._free: collections.deque[int] = collections.deque(range(1, self.num_pages))
        self._refcount = np.zeros(self.num_pages, np.int32)
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    # ----- sizes -----

    @property
    def capacity(self) -> int:
        """Pages that can be allocated (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Distinct pages held by at least one sequence."""
        return self.capacity - self.num_free

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.page_size)

    # ----- queries -----

    @property
    def sequences(self) -> tuple:
        """Ids of the sequences holding a page table, in allocation order."""
        return tuple(self._tables)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._tables

    def _table(self, seq_id) -> list[int]:
        try:
            return self._tables[seq_id]
        except (KeyError, TypeError):
            raise ValueError(
                f"sequence {seq_id!r} holds no pages: it was never allocated or was already freed"
            ) from None

    def page_table(self, seq_id) -> tuple[int, ...]:
        return tuple(self._table(seq_id))

    def length(self, seq_id) -> int:
        self._table(seq_id)
        return self._lengths[seq_id]

    def refcount(self, page: int) -> int:
        return int(self._refcount[page])

    def pages_needed(self, seq_id, new_tokens: int) -> int:
        """New pages `append(seq_id, new_tokens)` would allocate."""
        new_tokens = _check_count(seq_id, "new_tokens", new_tokens)
        return self.pages_for(self.length(seq_id) + new_tokens) - len(self._table(seq_id))

    def can_admit(self, num_prompt_tokens: int) -> bool:
        """True if the pool can hold a prompt of this many tokens plus one page for its first decode tokens."""
        return self.pages_for(num_prompt_tokens) + 1 <= self.num_free

    # ----- operations -----

    def _take(self, seq_id, count: int, why: str) -> list[int]:
        if count > len(self._free):
            raise PoolExhausted(
                f"sequence {seq_id!r}: {why} needs {count} free pages, the pool has {len(self._free)} "
                f"of {self.capacity} (page_size={self.page_size})"
            )
        pages = [self._free.popleft() for _ in range(count)]
        self._refcount[pages] = 1
        return pages

    def _new_id(self, seq_id) -> None:
        try:
            taken = seq_id in self._tables
        except TypeError:
            raise ValueError(f"sequence id {seq_id!r} is not hashable") from None
        if taken:
            raise ValueError(f"sequence {seq_id!r} already holds pages; free it before reusing its id")

    def allocate(self, seq_id, num_tokens: int) -> list[int]:
        """A new sequence of `num_tokens` positions (0 gives an empty table); returns its pages."""
        self._new_id(seq_id)
        num_tokens = _check_count(seq_id, "num_tokens", num_tokens)
        pages = self._take(seq_id, self.pages_for(num_tokens), f"allocating {num_tokens} tokens")
        self._tables[seq_id] = pages
        self._lengths[seq_id] = num_tokens
        return list(pages)

    def admit(self, seq_id, num_prompt_tokens: int) -> list[int]:
        """`allocate` for a new request's prompt, refused (PoolExhausted, nothing changed) unless
        `can_admit`: the prompt plus one page must fit."""
        self._new_id(seq_id)
        num_prompt_tokens = _check_count(seq_id, "num_prompt_tokens", num_prompt_tokens)
        if not self.can_admit(num_prompt_tokens):
            raise PoolExhausted(
                f"sequence {seq_id!r}: a prompt of {num_prompt_tokens} tokens needs "
                f"{self.pages_for(num_prompt_tokens)} pages plus 1 for decoding, the pool has {self.num_free} "
                f"free of {self.capacity} (page_size={self.page_size}); the request must wait"
            )
        return self.allocate(seq_id, num_prompt_tokens)

    def append(self, seq_id, new_tokens: int) -> list[int]:
        """Grows a sequence by `new_tokens` positions; returns the pages this added (often none)."""
        table = self._table(seq_id)
        new_tokens = _check_count(seq_id, "new_tokens", new_tokens)
        length = self._lengths[seq_id]
        if length % self.page_size and self._refcount[table[-1]] != 1:  # the invariant `fork` keeps
            raise RuntimeError(f"sequence {seq_id!r}: its partly filled last page {table[-1]} is shared")
        pages = self._take(seq_id, self.pages_for(length + new_tokens) - len(table), f"appending {new_tokens} tokens")
        table.extend(pages)
        self._lengths[seq_id] = length + new_tokens
        return pages

    def fork(self, parent_id, child_id) -> list[tuple[int, int]]:
        """A child sequence with the parent's tokens: it shares the parent's full pages and gets a copy of
        the partly filled last page, if any. Returns the (src_page, dst_page) copies the device must make
        (at most one) before either sequence writes again."""
        parent = self._table(parent_id)
        self._new_id(child_id)
        length = self._lengths[parent_id]
        full = length // self.page_size
        copies = []
        if full < len(parent):  # a partly filled last page: the child's own copy
            (dst,) = self._take(child_id, 1, f"forking {parent_id!r} (copy of its last page)")
            copies.append((parent[full], dst))
        shared = parent[:full]
        self._refcount[shared] += 1
        self._tables[child_id] = shared + [dst for _, dst in copies]
        self._lengths[child_id] = length
        return copies

    def free(self, seq_id) -> list[int]:
        """Drops a sequence; its pages' counts fall by one. Returns the pages that went back to the free list."""
        table = self._table(seq_id)
        del self._tables[seq_id], self._lengths[seq_id]
        released = []
        for page in reversed(table):  # the tail first, as vLLM does
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                released.append(page)
        self._free.extend(released)
        return released

    # ----- device arrays -----

    def page_table_array(self, seq_ids: Sequence, max_pages: int) -> np.ndarray:
        """int32 [len(seq_ids), max_pages]: each slot's pages, padded with NULL_PAGE; a None slot is all null."""
        table_bp = np.full((len(seq_ids), max_pages), NULL_PAGE, np.int32)
        for row, seq_id in enumerate(seq_ids):
            if seq_id is None:
                continue
            pages = self._table(seq_id)
            if len(pages) > max_pages:
                raise ValueError(
                    f"sequence {seq_id!r} holds {len(pages)} pages, more than max_pages={max_pages} per slot"
                )
            table_bp[row, : len(pages)] = pages
        return table_bp

    def lengths_array(self, seq_ids: Sequence) -> np.ndarray:
        """int32 [len(seq_ids)]: tokens held by each slot's sequence (0 for a None slot)."""
        return np.array([0 if s is None else self.length(s) for s in seq_ids], np.int32)

    # ----- checks -----

    def check_full(self) -> None:
        """Raises unless every page is back in the free list (no sequence holds one): tests end with it."""
        problems = []
        if self._tables:
            problems.append(f"sequences still hold pages: {', '.join(map(repr, self._tables))}")
        if len(set(self._free)) != self.capacity or NULL_PAGE in self._free:
            problems.append(f"{self.capacity - len(set(self._free) - {NULL_PAGE})} pages missing from the free list")
        if np.any(self._refcount):
            problems.append(f"pages with a non-zero count: {np.flatnonzero(self._refcount).tolist()}")
        if problems:
            raise AssertionError("page pool is not full: " + "; ".join(problems))
