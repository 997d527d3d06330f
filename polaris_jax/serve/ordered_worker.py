"""The one thread that runs training work, each training client's requests in its seq_id order.

    worker = OrderedWorker()
    worker.submit(model_id, seq_id, task)   # runs once every earlier seq_id of model_id ran (or was skipped)
    worker.skip(model_id, seq_id)           # a request refused at submit: its seq_id is used up
    worker.submit_now(task)                 # unordered (creating a client)

    worker = OrderedWorker(run_together=fn)  # fn(items): several clients' requests as one call
    worker.submit(model_id, seq_id, task, together=(key, item))

A request submitted with `together` may run with the other clients' requests that are next in their own
order and carry the same key (multi-LoRA: one forward_backward over every adapter): `run_together` gets
their items, and each request's own task is not run. Order within each client is unchanged.

The tinker SDK pipelines (a client's optim_step may arrive before its forward_backward's result is
fetched) and sends a forward_backward's chunks in parallel, so requests can arrive out of order; the
worker holds them until the gap fills. A gap that never fills (a request lost before it reached us)
is passed after `gap_timeout_s`, so a client never hangs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable


@dataclasses.dataclass
class _Queue:
    next_seq: int | None = None
    waiting: dict = dataclasses.field(default_factory=dict)  # seq_id -> (arrival time, task, together)
    skipped: set = dataclasses.field(default_factory=set)

    def peek(self):
        """(arrival time, task, together) of the next request in order if it arrived, else None."""
        while self.next_seq in self.skipped:
            self.skipped.discard(self.next_seq)
            self.next_seq += 1
        return self.waiting.get(self.next_seq)

    def take(self, seq_id: int):
        _, task, together = self.waiting.pop(seq_id)
        self.next_seq = max(self.next_seq, seq_id + 1)
        return task, together


class OrderedWorker:
    def __init__(self, first_seq: int = 1, gap_timeout_s: float = 5.0, run_together: Callable | None = None):
        self.first_seq, self.gap_timeout_s, self.run_together = first_seq, gap_timeout_s, run_together
        self._queues: dict[str, _Queue] = collections.defaultdict(lambda: _Queue(first_seq))
        self._now: collections.deque[Callable] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name="polaris-trainer", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        with self._cond:
            return len(self._now) + sum(len(q.waiting) for q in self._queues.values())

    def start_at(self, model_id: str, seq_id: int) -> None:
        with self._cond:
            self._queues[model_id].next_seq = seq_id

    def submit(self, model_id: str, seq_id: int, task: Callable, together: tuple | None = None) -> None:
        with self._cond:
            self._queues[model_id].waiting[seq_id] = (time.monotonic(), task, together)
            self._cond.notify()

    def skip(self, model_id: str, seq_id: int) -> None:
        with self._cond:
            self._queues[model_id].skipped.add(seq_id)
            self._cond.notify()

    def submit_now(self, task: Callable) -> None:
        with self._cond:
            self._now.append(task)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(10.0)

    def _next_task(self) -> Callable | None:
        if self._now:
            return self._now.popleft()
        now = time.monotonic()
        for q in self._queues.values():
            if q.peek() is not None:
                return self._with_others(q, *q.take(q.next_seq))
            if q.waiting:
                first = min(q.waiting)
                if first < q.next_seq or now - q.waiting[first][0] > self.gap_timeout_s:
                    if first > q.next_seq:
                        logging.warning("seq_ids %d..%d never arrived; running %d", q.next_seq, first - 1, first)
                    return self._with_others(q, *q.take(first))
        return None

    def _with_others(self, first: _Queue, task: Callable, together) -> Callable:
        """The task, or one call running it with the next requests of other clients that share its key."""
        if together is None or self.run_together is None:
            return task
        items = [together[1]]
        for q in self._queues.values():
            entry = None if q is first else q.peek()
            if entry is not None and entry[2] is not None and entry[2][0] == together[0]:
                items.append(q.take(q.next_seq)[1][1])
        return task if len(items) == 1 else functools.partial(self.run_together, items)

    def _run(self) -> None:
        while True:
            with self._cond:
                task = self._next_task()
                while task is None and not self._closed:
                    self._cond.wait(0.5)
                    task = self._next_task()
                if self._closed:
                    return
            started = time.monotonic()
            try:
                task()
            except Exception:  # noqa: BLE001 - each task reports its own failure; this only keeps the thread alive
                logging.exception("training task failed")
            self.busy_s += time.monotonic() - started
