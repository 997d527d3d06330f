"""Bounded-staleness asynchronous rollouts: the next batches are sampled while the learner updates.

With `rollout.max_staleness = k >= 1`, a background thread collects the batch of step t + k + 1 with the
weights right after update t, while update t + 1 runs; so the batch of step t was sampled by weights at
most k updates old (the one-step-off-policy trainer of verl and slime is k = 1; AReaL bounds staleness the
same way). Batches are collected one at a time, in step order, so the prompt stream, the rescue buffer
and the seeds advance exactly as in the synchronous loop; only the weights that sample them differ.
k = 0 is the synchronous loop itself (`loop.train_step`), unchanged.

    ahead = RolloutAhead(collect, max_staleness=k)
    ahead.start(first_step, total_steps, params_copy, version=first_step)
    for step in ...:
        collected, waited_s = ahead.take(step)
        update(...)
        ahead.after_update(step, total_steps, lambda: copy(params), version=step + 1)
    ahead.close()

The sampler gets its own copy of the weights (the update donates the state's buffers).
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Callable


class RolloutAhead:
    def __init__(self, collect: Callable, *, max_staleness: int):
        if max_staleness < 1:
            raise ValueError(f"max_staleness={max_staleness}: the asynchronous loop needs >= 1 (0 is synchronous)")
        self.collect, self.k = collect, max_staleness
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="polaris-rollout")
        self._pending: collections.deque = collections.deque()  # (step, future), in step order

    def _submit(self, step: int, params, version: int) -> None:
        self._pending.append((step, self._executor.submit(self.collect, step, params, version)))

    def start(self, first_step: int, total_steps: int, params, version: int) -> None:
        """Queues the first k + 1 batches, all sampled with `params`."""
        for step in range(first_step, min(first_step + self.k + 1, total_steps)):
            self._submit(step, params, version)

    def take(self, step: int):
        """(the collected batch of `step`, seconds the learner waited for it)."""
        queued, future = self._pending.popleft()
        if queued != step:
            raise RuntimeError(f"rollouts for step {queued} came up where step {step} was expected")
        started = time.perf_counter()
        collected = future.result()
        return collected, time.perf_counter() - started

    def after_update(self, step: int, total_steps: int, params_fn: Callable, version: int) -> None:
        """Queues the batch of step + k + 1, sampled with the weights `params_fn()` returns now."""
        if step + self.k + 1 < total_steps:
            self._submit(step + self.k + 1, params_fn(), version)

    def drain(self) -> None:
        """Waits until every queued batch is collected (e.g. before an evaluation shares the verifier)."""
        for _, future in self._pending:
            future.result()

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._executor.shutdown(wait=True)
        self._pending.clear()
