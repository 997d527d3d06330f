"""Streaming rollouts on one long-lived engine, for the asynchronous loop on the engine (`rollout.backend =
"engine"`, `rollout.max_staleness >= 1`).

A background thread owns one `Engine` (on the rollout mesh) and keeps it fed:
- Admission: prompts from the stage's stream in order, each one request of n samples whose seed is a
  function of its stream position; at most `rollout.max_prompts_in_flight` groups are held at once
  (decoding, being scored, or ready and not yet taken), and no more than the learner will take while the
  engine's weights are within max_staleness versions of its step (AReaL's bound).
- Streaming scoring: the moment a group's last sample finishes, its texts go to the verifier pool while
  decoding goes on. A scored group is ready, unless `keep(group)` refuses it (DAPO dynamic sampling drops
  zero-variance groups on arrival), and then its place admits another prompt: over-sampling on demand.
- Live weights: the learner `push`es each new version; the engine takes it between two of its steps.
  Samples in flight continue under the new weights over the KV the old ones wrote (PipelineRL), and each
  token records the version that sampled it.
- Partial rollouts: a group still decoding when a batch is taken stays in the engine, with its KV, tokens,
  logprobs and versions, and joins a later batch. `rollout.max_steps_per_response` caps how many versions
  one response may span: a push that would exceed it for some running response waits until that
  response finishes, and admission pauses meanwhile (so a cap of 1 mixes no versions in a response: verl's
  one-step-off-policy pipeline). Nothing sampled is thrown away or restarted for it.
- Replicas: with one engine per process (`replicas.py`), process i admits every `stride`-th position from i.
- Staleness: `take(step, count)` returns the first `count` ready groups in completion order whose every
  token was sampled by a version >= step - max_staleness; an older group is dropped and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

from polaris_jax.data.problems import Problem
from polaris_jax.rollout import completion_text
from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.requests import Completion, Request


@dataclasses.dataclass(eq=False)
class Group:
    """One prompt's n samples: admitted at stream `position`, then completed, then scored."""

    position: int
    problem: Problem
    completions: list[Completion] = dataclasses.field(default_factory=list)
    texts: list[str] = dataclasses.field(default_factory=list)
    scores: list = dataclasses.field(default_factory=list)
    future: object = None

    @property
    def versions(self) -> list[int]:
        return [v for c in self.completions for v in c.versions]


class StreamingRollouts:
    """See the module docstring. `problem_at(position)` gives the stream's problem; `request_for(group)` the
    engine request of a group (its id must be the group's position)."""

    def __init__(
        self,
        engine: Engine,
        *,
        problem_at: Callable[[int], Problem],
        request_for: Callable[[Group], Request],
        position: int,
        first_step: int,
        groups_per_step: int,
        tokenizer,
        pool,
        max_in_flight: int,
        max_steps_per_response: int,
        max_staleness: int,
        keep: Callable[[Group], bool] | None = None,
        stride: int = 1,
    ):
        self.engine, self.tokenizer, self.pool = engine, tokenizer, pool
        self._problem_at, self._request_for, self._keep = problem_at, request_for, keep
        self.position, self.stride = position, stride  # the next stream position to admit; the step to the one after
        self._next_step, self._per_step = first_step, groups_per_step  # the learner's next take
        self.max_in_flight, self.cap, self.max_staleness = max_in_flight, max_steps_per_response, max_staleness
        self._cv = threading.Condition()
        self._in_engine: dict[int, Group] = {}
        self._scoring: list[Group] = []
        self._ready: collections.deque[Group] = collections.deque()
        self._pending = None  # (params, version) pushed, not yet in the engine
        self._paused = self._closed = self._idle = False
        self._error: BaseException | None = None
        self.counters = collections.Counter()  # since the last take
        self._thread = threading.Thread(target=self._loop, name="polaris-streaming-rollouts", daemon=True)
        self._thread.start()

    # ----- the learner's side -----

    def push(self, params, version: int) -> None:
        """New weights for the engine (the newest push wins if an earlier one is still waiting)."""
        with self._cv:
            self._pending = (params, int(version))
            self._cv.notify_all()

    def take(self, step: int, count: int) -> tuple[list[Group], dict]:
        """Blocks until `count` fresh groups are ready; returns them and the counters since the last take."""
        oldest = step - self.max_staleness
        with self._cv:
            while True:
                self._raise_if_failed()
                fresh = [g for g in self._ready if min(g.versions) >= oldest]
                if len(fresh) < len(self._ready):
                    self.counters["dropped_stale"] += len(self._ready) - len(fresh)
                    self._ready = collections.deque(fresh)
                    self._cv.notify_all()  # their places admit new prompts
                if len(self._ready) >= count:
                    break
                self._cv.wait()
            groups = [self._ready.popleft() for _ in range(count)]
            self._next_step = step + 1
            counters, self.counters = dict(self.counters), collections.Counter()
            counters["carried"] = sum(1 for g in self._in_engine.values() if self._started(g))
            self._cv.notify_all()
        return groups, counters

    def pause(self) -> None:
        """Stops stepping the engine (e.g. while an evaluation uses the cores and the verifier) until
        `resume()`; returns once the thread is idle."""
        with self._cv:
            self._paused = True
            self._cv.notify_all()
            while not self._idle and not self._error and self._thread.is_alive():
                self._cv.wait()

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def close(self) -> None:
        """Stops the thread; groups in flight are abandoned with the engine."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    # ----- the engine's thread -----

    def _count(self, key: str, value: float = 1) -> None:
        with self._cv:  # take() swaps the counters under the lock
            self.counters[key] += value

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the streaming rollout thread failed: {self._error!r}") from self._error

    def _started(self, group: Group) -> bool:
        return any(c.tokens for c in self.engine.progress(group.position))

    def _held(self) -> int:
        return len(self._in_engine) + len(self._scoring) + len(self._ready)

    def _admissible(self) -> int:
        """How many groups may be held: `max_in_flight`, and no more than the learner can take before the
        engine's current weights are more than max_staleness versions old (AReaL's admission bound)."""
        batches = self.engine.version + self.max_staleness - self._next_step + 1
        return min(self.max_in_flight, max(batches, 0) * self._per_step)

    def _has_work(self) -> bool:
        return bool(
            self.engine.busy
            or self._pending is not None
            or any(g.future.done() for g in self._scoring)
            or self._held() < self._admissible()
        )

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and (self._paused or not self._has_work()):
                        self._idle = True
                        self._cv.notify_all()
                        self._cv.wait()
                    self._idle = False
                    if self._closed:
                        return
                    pending = self._pending
                deferred = pending is not None and not self._apply(pending)
                if not deferred:
                    self._admit()
                if self.engine.busy:
                    started = time.perf_counter()
                    self.engine.step()
                    self._count("engine_s", time.perf_counter() - started)
                    self._finish_groups()
                self._collect_scored()
        except BaseException as e:  # surfaced to the learner by take()
            with self._cv:
                self._error = e
                self._idle = True
                self._cv.notify_all()

    def _apply(self, pending) -> bool:
        """Puts pushed weights into the engine unless a running response would then span more than the cap."""
        params, version = pending
        for group in self._in_engine.values():
            for c in self.engine.progress(group.position):
                if c.finish_reason is None and c.versions and version - c.versions[0] + 1 > self.cap:
                    self._count("pushes_deferred_steps")
                    return False
        self.engine.update_params(params, version)
        with self._cv:
            if self._pending is pending:
                self._pending = None
        self._count("pushes")
        return True

    def _admit(self) -> None:
        while self._held() < self._admissible():
            group = Group(self.position, self._problem_at(self.position))
            self.engine.submit(self._request_for(group))
            with self._cv:
                self._in_engine[group.position] = group
            self.position += self.stride
            self._count("admitted")

    def _finish_groups(self) -> None:
        with self._cv:  # take() reads the engine's progress of the groups in _in_engine
            for position in [p for p in self._in_engine if self.engine.finished(p)]:
                group = self._in_engine.pop(position)
                group.completions = self.engine.pop_finished(position)
                group.texts = [completion_text(self.tokenizer, c) for c in group.completions]
                group.future = self.pool.score_async(group.texts, [group.problem.answer] * len(group.texts))
                group.future.add_done_callback(self._wake)
                self._scoring.append(group)

    def _wake(self, _future) -> None:
        with self._cv:
            self._cv.notify_all()

    def _collect_scored(self) -> None:
        done = [g for g in self._scoring if g.future.done()]
        for group in done:
            group.scores = group.future.result()
        kept = [g for g in done if self._keep is None or self._keep(g)]
        with self._cv:
            self._scoring = [g for g in self._scoring if g not in done]
            self._ready.extend(kept)
            self.counters["dropped_uninformative"] += len(done) - len(kept)
            self._cv.notify_all()
