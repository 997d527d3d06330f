"""The continuous-batching engine: a host-side scheduler over a paged KV cache and fixed-shape device steps.

    engine = Engine(config, params, EngineSettings(max_slots=64, num_pages=2048, page_size=16))
    engine.submit(Request(prompt=ids, max_new_tokens=512, temperature=0.6, n=8, eos_token_ids=(151645,), id="q1"))
    while engine.busy:
        for delta in engine.step():          # streaming: each sample's new tokens
            ...
    completions = engine.pop_finished("q1") # n Completions: tokens, logprobs, weight versions, finish reason
    engine.run([Request(...), ...])         # or: submit all, step until done, completions per request

Design (after vLLM's v1 scheduler and block pool, and Levanter's engine):

- Sequences, not slots, own state. A running sample is a host record (its context = prompt + tokens so
  far, its position, its key's (seed, sample, count)); its KV lives in pages of the pool
  (`pages.PagePool`, the one owner of KV memory). A decode slot is just a row of the next device call:
  each step packs the decoding samples densely into the smallest slot bucket that holds them
  (`EngineSettings.slot_buckets`), so a long tail of a few rows runs a small batch, and a finished
  sample frees its row and pages at once.
- One `step()`: (1) admit waiting requests in FIFO order while slots and pages allow (the prompt's pages
  plus one page per sample; otherwise the request waits — never an out-of-memory, never a silent
  truncation); (2) prefill up to `prefill_chunk` prompt tokens from the admitted prompts, a long prompt
  over several steps; (3) decode up to `decode_block` tokens for every decoding sample in one device
  call. The pages for those tokens are reserved first (`decode_block <= page_size`, so at most one page
  beyond the live tokens per sample); when the pool runs out, the most recently admitted samples are
  preempted (their pages freed, re-queued at the front, re-prefilled later from their tokens).
- n samples share one prefill. The prompt minus its last token is prefilled once; then each sample
  forks it (`PagePool.fork`: full pages shared, the partly filled last page copied on write) and its
  first decode iteration feeds the last prompt token, whose logits give its first sampled token.
- Randomness is per sample: fold_in(fold_in(key(seed), sample_offset + j), t) for token t, as in
  `generate`, so a request's outputs do not depend on what else runs, and a resumed partial rollout
  continues the same draws.
- Stop conditions: EOS ids end a row on device (the block's loop exits when every row is done); stop
  sequences are matched on the host over the returned tokens; the budget is max_new_tokens.
- Live weights: `update_params(params)` between steps; samples in flight continue under the new weights
  over the KV the old ones wrote (PipelineRL's in-flight update), and each token records the version
  of the weights that produced it.
- Control: `abort(id)` frees a request's pages and returns its partial completions; a partial sample
  resumes with `Completion.resume()`; the waiting queue holds at most `max_queue` requests (`QueueFull`).

No recompiles: the prefill chunk, the slot buckets, the decode block, the pool and the page-table width
are fixed per engine, and params, tokens, positions, tables and settings are traced values.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

import jax
import numpy as np

from polaris_jax.models import paged_kernels
from polaris_jax.models.paged_attention import NULL_PAGE, init_kv_pages
from polaris_jax.models.sharding import DEFAULT_RULES, to_host
from polaris_jax.sampling import engine_steps
from polaris_jax.sampling.engine_settings import EngineSettings
from polaris_jax.sampling.pages import PagePool, PoolExhausted
from polaris_jax.sampling.requests import Completion, Delta, QueueFull, Request, RequestError
from polaris_jax.sampling.sampler import batch_shards, decode_params, kv_dtype, put
from polaris_jax.sampling.strategies import RowSettings


class _Sample:
    """One running or waiting sample: its completion so far and the context its pages hold."""

    def __init__(self, request: Request, completion: Completion, ticket: int):
        self.request, self.completion = request, completion
        self.ticket = (ticket, completion.sample)  # admission order: preemption takes the largest
        self.key = (request.id, completion.sample)
        self.settings = request.settings()
        self.prefilled = 0  # context positions written into its pages
        self.followers: list[_Sample] = []  # samples forked from this one, decoding once its prompt is prefilled
        self.copies: list[tuple[int, int]] = []  # their page copies, made once the prefill wrote the page

    @property
    def generated(self) -> list[int]:
        return list(self.request.prefix) + self.completion.tokens

    @property
    def context(self) -> list[int]:
        return list(self.request.prompt) + self.generated

    @property
    def num_new(self) -> int:
        return len(self.request.prefix) + len(self.completion.tokens)

    @property
    def context_len(self) -> int:
        return len(self.request.prompt) + self.num_new

    @property
    def last_token(self) -> int:
        if self.completion.tokens:
            return self.completion.tokens[-1]
        return (self.request.prefix or self.request.prompt)[-1]


class Engine:
    """See the module docstring. `params` is the model's params (any layout `generate` takes); `version` is
    theirs (each token records the version that sampled it)."""

    def __init__(
        self,
        config,
        params,
        settings: EngineSettings | None = None,
        *,
        mesh=None,
        rules=DEFAULT_RULES,
        version: int = 0,
    ):
        settings = settings or EngineSettings()
        self._shards = batch_shards(mesh, rules)
        settings.check(config, self._shards)
        platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        kernel = paged_kernels.decode_kernel(  # a ConfigError before any compile; auto on one CPU: cpu_paged.cc
            config.paged_attention_impl if settings.attention_kernel == "auto" else settings.attention_kernel,
            platform,
            1 if mesh is None else mesh.size,
            config,
            settings.num_pages,
            settings.page_size,
            kv_dtype(config) or config.dtype,
        )
        config = config.replace(paged_attention_impl=kernel)
        self.config, self.settings, self.mesh, self.rules = config, settings, mesh, rules
        self._buckets = settings.buckets(self._shards)
        self._max_pages = -(-settings.max_seq_len // settings.page_size)
        self.pool = PagePool(settings.num_pages, settings.page_size)
        pages = init_kv_pages(config, settings.num_pages, settings.page_size, kv_dtype(config))
        self._pages = self._put_pages(pages)
        self.params, self.version = None, -1
        self.update_params(params, version)
        self._waiting: collections.deque[list[_Sample]] = collections.deque()
        self._prefilling: list[_Sample] = []  # admitted leaders whose prompt is being written
        self._decoding: dict[_Sample, None] = {}  # an ordered set
        self._requests: dict = {}  # id -> [Completion] for requests not yet popped
        self._unfinished: dict = collections.Counter()  # id -> samples not finished
        self._tickets = itertools.count()
        self._auto_ids = itertools.count()
        self._pending_copies: list[tuple[int, int]] = []
        self._record = settings.record_experts
        self.last_metrics: dict = {}
        self.totals = collections.Counter()

    # ----- weights -----

    def _put_pages(self, pages):
        if self.mesh is None:  # committed, as every step's output is: the first step then compiles nothing new
            return jax.device_put(pages, jax.devices()[0])
        return jax.device_put(pages, engine_steps.page_shardings(pages, self.mesh, self.rules))

    def update_params(self, params, version: int | None = None) -> None:
        """New weights from the next step on; samples in flight continue under them. Each token records the
        version that produced it (default: the previous version + 1)."""
        self.params = decode_params(self.config, params, self.mesh)
        self.version = self.version + 1 if version is None else int(version)

    # ----- requests -----

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding or self._pending_copies)

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request) -> object:
        """Queues a request (validated first: RequestError names it); returns its id. Raises QueueFull when
        `max_queue` requests wait."""
        if request.id is None:
            request = dataclasses.replace(request, id=f"request-{next(self._auto_ids)}")
        request.check(self.config.vocab_size, self.settings.max_seq_len)
        self.settings.check_request(request)
        if request.id in self._requests:
            raise RequestError(f"request {request.id!r}: that id is already in use")
        if len(self._waiting) >= self.settings.max_queue:
            raise QueueFull(f"request {request.id!r}: {len(self._waiting)} requests already wait (max_queue)")
        completions = [Completion(request, j) for j in range(request.n)]
        self._requests[request.id] = completions
        self._unfinished[request.id] = request.n
        ticket = next(self._tickets)
        self._waiting.append([_Sample(request, c, ticket) for c in completions])
        return request.id

    def finished(self, request_id) -> bool:
        return request_id in self._requests and self._unfinished[request_id] == 0

    def progress(self, request_id) -> list[Completion]:
        """A request's completions as they grow (the live objects: read, do not change them)."""
        if request_id not in self._requests:
            raise KeyError(f"request {request_id!r} is unknown or already popped")
        return self._requests[request_id]

    def pop_finished(self, request_id) -> list[Completion]:
        """A finished request's completions (sample order); it is forgotten afterwards."""
        if not self.finished(request_id):
            raise KeyError(f"request {request_id!r} is not finished (or unknown)")
        del self._unfinished[request_id]
        return self._requests.pop(request_id)

    def abort(self, request_id) -> list[Completion]:
        """Stops a request wherever it is and frees its pages; returns its completions so far (a sample that
        had not finished keeps finish_reason None: a partial rollout, resumable with `Completion.resume`)."""
        if request_id not in self._requests:
            raise KeyError(f"request {request_id!r} is unknown or already popped")
        self._waiting = collections.deque(g for g in self._waiting if g[0].request.id != request_id)
        for sample in [s for s in [*self._prefilling, *self._decoding] if s.request.id == request_id]:
            self._release(sample)
        self._unfinished[request_id] = 0
        return self.pop_finished(request_id)

    def run(self, requests) -> list[list[Completion]]:
        """Submits every request (as the queue allows), steps until all finish; completions per request."""
        ids, pending = [], collections.deque(requests)
        while pending or self.busy:
            while pending and len(self._waiting) < self.settings.max_queue:
                ids.append(self.submit(pending.popleft()))
            self.step()
        return [self.pop_finished(i) for i in ids]

    def warmup(self) -> None:
        """Compiles every program this engine can run (prefill, copy, decode at each slot bucket) on
        padding that writes nothing, so serving compiles nothing afterwards."""
        if self.busy:
            raise RuntimeError("warmup() writes padding only, but call it before submitting requests")
        chunk = self.settings.prefill_chunk
        padding = (
            np.zeros(chunk, np.int32),
            np.full(chunk, -1, np.int32),
            np.zeros((chunk, self._max_pages), np.int32),
            self._adapters(chunk),
        )
        self._pages, _ = engine_steps.prefill(
            self.config,
            self.params,
            self._pages,
            *put(padding, self.mesh, self.rules, rows=True),
            mesh=self.mesh,
            rules=self.rules,
            record=self._record,
        )
        self._pending_copies = [(NULL_PAGE, NULL_PAGE)]
        self._flush_copies()
        for rows in self._buckets:
            batch = put(self._decode_batch([], rows), self.mesh, self.rules, rows=True)
            self._pages, *_ = engine_steps.decode(
                self.config,
                self.params,
                self._pages,
                batch,
                block=self.settings.decode_block,
                mesh=self.mesh,
                rules=self.rules,
                record=self._record,
            )

    # ----- the step -----

    def step(self) -> list[Delta]:
        """Admits, prefills one chunk, decodes one block; returns the new tokens of every sample."""
        self._admit()
        prefill_tokens = self._prefill()
        deltas: list[Delta] = []
        decode_tokens, rows = self._decode(deltas)
        self.last_metrics = dict(
            live_slots=len(self._prefilling) + len(self._decoding),
            decode_rows=rows,
            pages_used=self.pool.num_used,
            pages_free=self.pool.num_free,
            queue_length=len(self._waiting),
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
        )
        self.totals.update(steps=1, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens)
        self.totals["max_pages_used"] = max(self.totals["max_pages_used"], self.pool.num_used)
        return deltas

    def _running(self) -> int:
        return sum(1 + len(s.followers) for s in self._prefilling) + len(self._decoding)

    def _admit(self) -> None:
        while self._waiting:
            group = self._waiting[0]
            leader = group[0]
            written = leader.context_len - 1
            if self._running() + len(group) > self.settings.max_slots:
                return
            if self.pool.pages_for(written) + len(group) > self.pool.num_free:
                return  # waits for pages: prompt plus one page per sample
            self._waiting.popleft()
            self.pool.allocate(leader.key, written)
            # The followers fork now (their pages are counted from admission on); the copies of the partly
            # filled last page wait until the prefill has written it.
            leader.prefilled, leader.followers, leader.copies = 0, group[1:], []
            for follower in leader.followers:
                leader.copies += self.pool.fork(leader.key, follower.key)
            self._prefilling.append(leader)
            if written == 0:
                self._prefill_done(leader)

    def _prefill_done(self, leader: _Sample) -> None:
        self._prefilling.remove(leader)
        leader.prefilled = leader.context_len - 1
        self._pending_copies += leader.copies
        for follower in leader.followers:
            follower.prefilled = leader.prefilled
            if self._record:  # the prompt's experts, shared like its pages
                follower.completion.routed_experts = leader.completion.routed_experts[: leader.prefilled].copy()
        self._decoding.update(dict.fromkeys([leader] + leader.followers))
        leader.followers, leader.copies = [], []

    def _prefill(self) -> int:
        chunk = self.settings.prefill_chunk
        token_c = np.zeros(chunk, np.int32)
        position_c = np.full(chunk, -1, np.int32)
        table_cp = np.full((chunk, self._max_pages), NULL_PAGE, np.int32)
        adapter_c = self._adapters(chunk)
        used, done, spans = 0, [], []
        for leader in self._prefilling:
            if used == chunk:
                break
            context = leader.context
            take = min(chunk - used, len(context) - 1 - leader.prefilled)
            span = slice(used, used + take)
            token_c[span] = context[leader.prefilled : leader.prefilled + take]
            position_c[span] = np.arange(leader.prefilled, leader.prefilled + take)
            table_cp[span] = self.pool.page_table_array([leader.key], self._max_pages)
            if adapter_c is not None:
                adapter_c[span] = leader.request.adapter
            spans.append((leader, leader.prefilled, take))
            leader.prefilled += take
            used += take
            if leader.prefilled == len(context) - 1:
                done.append(leader)
        if used:
            batch = put((token_c, position_c, table_cp, adapter_c), self.mesh, self.rules, rows=True)
            self._pages, experts_clk = engine_steps.prefill(
                self.config, self.params, self._pages, *batch, mesh=self.mesh, rules=self.rules, record=self._record
            )
            if self._record:
                experts_clk, start = to_host(experts_clk), 0
                for leader, first, take in spans:
                    leader.completion.record_experts(first, experts_clk[start : start + take])
                    start += take
        for leader in done:
            self._prefill_done(leader)
        return used

    def _flush_copies(self) -> None:
        width = self.settings.max_slots
        while self._pending_copies:
            pairs, self._pending_copies = self._pending_copies[:width], self._pending_copies[width:]
            src_c = np.zeros(width, np.int32)
            dst_c = np.full(width, NULL_PAGE, np.int32)
            src_c[: len(pairs)], dst_c[: len(pairs)] = zip(*pairs)
            src_c, dst_c = put((src_c, dst_c), self.mesh, self.rules, rows=False)
            self._pages = engine_steps.copy(self._pages, src_c, dst_c, mesh=self.mesh, rules=self.rules)

    def _reserve(self) -> list[tuple[_Sample, int]]:
        """Pages for this block's tokens of every decoding sample, preempting the newest when they run out."""
        reserved = []
        for sample in sorted(self._decoding, key=lambda s: s.ticket):
            if sample not in self._decoding:
                continue  # preempted below for an older sample
            budget = min(self.settings.decode_block, sample.request.max_new_tokens - sample.num_new)
            while True:
                try:
                    self.pool.append(sample.key, budget)
                    reserved.append((sample, budget))
                    break
                except PoolExhausted:
                    victim = max([*self._decoding, *self._prefilling], key=lambda s: s.ticket)
                    self._preempt(victim)
                    if victim is sample:
                        break
        return reserved

    def _decode(self, deltas: list[Delta]) -> tuple[int, int]:
        self._flush_copies()
        reserved = self._reserve()
        self._flush_copies()
        if not reserved:
            return 0, 0
        rows = next(b for b in self._buckets if b >= len(reserved))
        # Longest first: paged attention runs rows in groups, each as long as its longest row.
        reserved.sort(key=lambda item: -item[0].context_len)
        batch = self._decode_batch(reserved, rows)
        self._pages, tokens_br, logprobs_br, _, experts_brlk = engine_steps.decode(
            self.config,
            self.params,
            self._pages,
            put(batch, self.mesh, self.rules, rows=True),
            block=self.settings.decode_block,
            mesh=self.mesh,
            rules=self.rules,
            record=self._record,
        )
        # All-gathered where rows span processes.
        tokens_br, logprobs_br, experts_brlk = to_host((tokens_br, logprobs_br, experts_brlk))
        generated = 0
        for b, (sample, budget) in enumerate(reserved):
            if self._record:  # the experts of the tokens fed: the last one, then the new ones
                sample.completion.record_experts(sample.context_len - 1, experts_brlk[b, :budget])
            generated += self._accept(sample, tokens_br[b, :budget].tolist(), logprobs_br[b, :budget].tolist(), deltas)
        return generated, rows

    def _decode_batch(self, reserved, rows: int) -> engine_steps.DecodeBatch:
        eos_width = self.settings.max_eos_ids
        ints = lambda fill=0: np.full(rows, fill, np.int32)
        token_b, position_b, budget_b, seed_b, sample_b, num_new_b = (ints() for _ in range(6))
        eos_ids_b = np.full((rows, eos_width), -1, np.int32)
        for b, (sample, budget) in enumerate(reserved):
            token_b[b], position_b[b], budget_b[b] = sample.last_token, sample.context_len - 1, budget
            request = sample.request
            seed_b[b], sample_b[b], num_new_b[b] = (
                request.seed,
                request.sample_offset + sample.completion.sample,
                sample.num_new,
            )
            eos_ids_b[b, : len(request.eos_token_ids)] = request.eos_token_ids
        adapter_b = self._adapters(rows)
        if adapter_b is not None:
            adapter_b[: len(reserved)] = [s.request.adapter for s, _ in reserved]
        logprob_b = np.zeros(rows, bool)
        logprob_b[: len(reserved)] = [s.request.logprobs for s, _ in reserved]
        keys = [s.key for s, _ in reserved] + [None] * (rows - len(reserved))
        return engine_steps.DecodeBatch(
            token_b=token_b,
            position_b=position_b,
            table_bp=self.pool.page_table_array(keys, self._max_pages),
            budget_b=budget_b,
            seed_b=seed_b,
            sample_b=sample_b,
            num_new_b=num_new_b,
            eos_ids_b=eos_ids_b,
            settings=RowSettings.stack([s.settings for s, _ in reserved], rows),
            adapter_b=adapter_b,
            logprob_b=logprob_b,
        )

    def _adapters(self, rows: int):
        """Each row's adapter slot (multi-LoRA; None without a stack)."""
        return np.zeros(rows, np.int32) if self.settings.adapter_slots else None

    def _accept(self, sample: _Sample, tokens: list[int], logprobs: list[float], deltas: list[Delta]) -> int:
        """Appends a block's tokens up to the first stop; finishes the sample if it stopped."""
        request, completion = sample.request, sample.completion
        reason = None
        # The generated tokens' tail that a stop sequence could end in, then this block's tokens.
        longest = max((len(q) for q in request.stop_sequences), default=0)
        window = sample.generated[-longest:] if longest else []
        num_new = sample.num_new
        for i, token in enumerate(tokens):
            window.append(token)
            num_new += 1
            if token in request.eos_token_ids:
                reason = "eos"
            elif any(window[-len(q) :] == list(q) for q in request.stop_sequences):
                reason = "stop"
            elif num_new >= request.max_new_tokens:
                reason = "length"
            if reason:
                tokens, logprobs = tokens[: i + 1], logprobs[: i + 1]
                break
        completion.tokens += tokens
        completion.logprobs += logprobs
        completion.versions += [self.version] * len(tokens)
        sample.prefilled += len(tokens)
        deltas.append(Delta(request.id, completion.sample, tokens, logprobs, reason))
        if reason:
            completion.finish_reason = reason
            if self._record:  # past the stop: experts of tokens never kept
                completion.routed_experts = completion.routed_experts[: sample.context_len - 1]
            self._release(sample)
            self._unfinished[request.id] -= 1
        return len(tokens)

    def _release(self, sample: _Sample) -> None:
        """Frees a sample's pages (and, for a prompt still prefilling, its followers')."""
        if sample in self._decoding:
            del self._decoding[sample]
        elif sample in self._prefilling:
            self._prefilling.remove(sample)
        for s in [sample] + sample.followers:
            if s.key in self.pool:
                self.pool.free(s.key)

    def _preempt(self, sample: _Sample) -> None:
        """Frees a sample's pages and re-queues it (with any samples waiting to fork it) at the front."""
        followers = sample.followers
        self._release(sample)
        sample.prefilled, sample.followers, sample.copies = 0, [], []
        self._waiting.appendleft([sample] + followers)
        self.totals.update(preemptions=1)
