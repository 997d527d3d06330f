"""A process pool for verification with a wall-clock timeout on every item.

Why not `concurrent.futures.ProcessPoolExecutor`: it has no per-task timeout and one dead
worker breaks the whole pool. Why not math-verify's own timeout: it is `signal.alarm`, which
only works on the main thread (verl scored every sample 0 when it ran off the main thread)
and cannot interrupt a long big-integer operation in C anyway. Killing the process is the
only timeout that always works, so each worker runs one item at a time; a worker that
overruns its deadline is killed, one that dies is noticed when its pipe closes, and either
way it is replaced and its item gets the caller's failure value with a logged reason.

To keep hand-offs off the critical path on busy machines, each worker is sent a few small
items ahead (bounded so they always fit in the pipe, so a send never blocks the dispatcher);
the timeout clock of an item starts when the worker finishes the previous one, and items
queued behind a killed worker go back to the front of the queue, not to the failure value.

Workers are fresh interpreters (`python -m polaris_jax.rewards.worker`): the pool never
forks the multithreaded JAX parent and never re-runs the caller's `__main__`, so it works
from scripts, notebooks and threads alike. Batches go to a dispatcher thread and come back
as futures, so scoring overlaps with whatever the caller does next.

`math_reward` is the public one-call contract: it scores in a process-wide pool (`default_pool`,
started on first use), so even a completion that makes sympy spin returns within the timeout.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import itertools
import logging
import multiprocessing.connection
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import polaris_jax
from polaris_jax.rewards import scoring
from polaris_jax.rewards.extraction import ExtractionConfig

logger = logging.getLogger(__name__)

# The worker's first message; not imported from worker.py, which must stay out of
# sys.modules until `python -m` runs it.
READY = "ready"
# A worker gets this long to import sympy and math-verify and report ready.
_STARTUP_TIMEOUT_S = 120.0
# Items sent ahead to a busy worker: at most this many, and this many unread bytes in total
# (a Linux pipe holds 64 KiB, so these sends never block).
_PREFETCH_ITEMS = 8
_PREFETCH_BYTES = 32 * 1024
# Default pool size: one worker per core, but a 200-core host does not need 200 sympy processes.
_DEFAULT_MAX_WORKERS = 8
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(polaris_jax.__file__)))


class _Batch:
    def __init__(self, size: int, on_failure: Callable[[str], Any]):
        self.results: list[Any] = [None] * size
        self.remaining = size
        self.on_failure = on_failure
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()

    def finish(self, index: int, value: Any) -> None:
        self.results[index] = value
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(self.results)


class _Item:
    """One queued call; its pickled (fn, args) is built once, when first needed."""

    __slots__ = ("batch", "index", "fn", "args", "payload")

    def __init__(self, batch: _Batch, index: int, fn: Callable, args: tuple):
        self.batch, self.index, self.fn, self.args = batch, index, fn, args
        self.payload: bytes | None = None


class _Worker:
    """One worker process, the two pipes to it, and the items sent to it in order."""

    def __init__(self, memory_limit_mb: int | None):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        env.setdefault("JAX_PLATFORMS", "cpu")  # in case anything imports jax; workers never need a GPU
        command = [sys.executable, "-m", "polaris_jax.rewards.worker", str(to_child_r), str(from_child_w)]
        command.append(str(memory_limit_mb or 0))
        try:
            self.process = subprocess.Popen(
                command, pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.sender = Connection(to_child_w, readable=False)
        self.receiver = Connection(from_child_r, writable=False)
        self.ready = False
        self.started = time.monotonic()
        self.inflight: collections.deque = collections.deque()  # (task_id, _Item), head is running
        self.head_started = 0.0  # when the head item began: its send, or the previous reply

    def unread_bytes(self) -> int:
        return sum(len(item.payload) for _, item in itertools.islice(self.inflight, 1, None))

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Kill and reap the process: workers hold no state worth a graceful exit."""
        if self.alive():
            self.process.kill()
        self.process.wait()
        self.sender.close()
        self.receiver.close()


class VerifierPool:
    """Runs verification items in worker processes, each item under a wall-clock timeout.

    `map_async(fn, args_list, on_failure)` is the general form (fn must be a module-level
    function); `score_async` / `score` grade completions against gold answers.

    num_workers: worker processes (default: one per core, at most 8).
    timeout_s: wall-clock limit per item, from when its worker starts on it.
    extraction: how `score_async` finds the final answer (think policy, fallbacks).
    memory_limit_mb: address-space limit per worker (RLIMIT_AS); None for no limit.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        extraction: ExtractionConfig = ExtractionConfig(),
        memory_limit_mb: int | None = 4096,
    ):
        num_workers = num_workers or min(_DEFAULT_MAX_WORKERS, os.cpu_count() or 1)
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.extraction = extraction
        self._memory_limit_mb = memory_limit_mb
        self._num_workers = num_workers
        self._workers: list[_Worker] = []  # started by the dispatcher thread, see _dispatch
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake_reader, self._wake_writer = multiprocessing.connection.Pipe(duplex=False)
        self._task_ids = itertools.count()
        self._closing = False
        self.failures: collections.Counter = collections.Counter()
        self._thread = threading.Thread(target=self._dispatch, name="verifier-pool", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------

    def map_async(
        self,
        fn: Callable,
        args_list: Sequence[tuple],
        on_failure: Callable[[str], Any],
    ) -> concurrent.futures.Future:
        """Future of [fn(*args) for args in args_list]; a timed-out, crashed or raising
        item gets on_failure(reason) instead."""
        if self._closing:
            raise RuntimeError("VerifierPool is closed")
        batch = _Batch(len(args_list), on_failure)
        if not args_list:
            batch.future.set_result([])
            return batch.future
        with self._lock:
            self._pending.extend(_Item(batch, i, fn, tuple(args)) for i, args in enumerate(args_list))
        self._wake_writer.send_bytes(b"x")
        if self._closing and not self._thread.is_alive():  # closed while we were enqueuing
            self._fail_all("VerifierPool is closed")
        return batch.future

    def score_async(self, completions: Sequence[str], golds: Sequence[str]) -> concurrent.futures.Future:
        """Future of one `Score` per (completion, gold) pair."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        for i, (completion, gold) in enumerate(zip(completions, golds)):
            if not isinstance(completion, str) or not isinstance(gold, str):
                raise TypeError(
                    f"item {i}: completion and gold must be str, got "
                    f"{type(completion).__name__} and {type(gold).__name__}"
                )
            if not gold.strip():
                raise ValueError(f"item {i}: gold answer is empty")
        args = [(c, g, self.extraction) for c, g in zip(completions, golds)]
        return self.map_async(scoring.score_completion, args, _failed_score)

    def score(self, completions: Sequence[str], golds: Sequence[str]) -> list[scoring.Score]:
        return self.score_async(completions, golds).result()

    def close(self) -> None:
        """Stop the workers; batches still pending fail with RuntimeError."""
        if self._closing:
            return
        self._closing = True
        self._wake_writer.send_bytes(b"x")
        self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closing

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- dispatcher thread ----------------------------------------------------------------

    def _dispatch(self) -> None:
        try:
            # Workers die with the thread that started them (PR_SET_PDEATHSIG), so they are
            # started here, on the thread that lives exactly as long as the pool.
            self._workers = [_Worker(self._memory_limit_mb) for _ in range(self._num_workers)]
            while not self._closing:
                self._assign()
                self._wait_and_collect()
        except BaseException as error:  # never leave callers waiting on futures forever
            logger.exception("verifier pool dispatcher failed")
            self._closing = True
            self._fail_all(f"dispatcher failed: {error!r}")
        else:
            self._fail_all("VerifierPool was closed")
        for worker in self._workers:
            worker.stop()

    def _next_item(self, worker: _Worker) -> _Item | None:
        """Pop the next pending item if it may be sent to `worker` now."""
        with self._lock:
            if not self._pending:
                return None
            item = self._pending[0]
            if item.payload is None:
                try:
                    item.payload = pickle.dumps((item.fn, item.args), pickle.HIGHEST_PROTOCOL)
                except Exception as error:  # e.g. a lambda: fail this item, never the pool
                    self._pending.popleft()
                    item.payload = repr(error).encode()
                    item.fn = None
                    return item
            if worker.inflight and (
                len(worker.inflight) >= _PREFETCH_ITEMS or worker.unread_bytes() + len(item.payload) > _PREFETCH_BYTES
            ):
                return None
            return self._pending.popleft()

    def _assign(self) -> None:
        for position, worker in enumerate(self._workers):
            while worker.ready and (item := self._next_item(worker)) is not None:
                if item.fn is None:
                    self._fail(item, "send", f"could not pickle item: {item.payload.decode()}")
                    continue
                task_id = next(self._task_ids)
                try:
                    worker.sender.send_bytes(task_id.to_bytes(8, "little") + item.payload)
                except Exception as error:  # unpicklable args, or the worker died meanwhile
                    if worker.alive():
                        self._fail(item, "send", f"could not send item: {type(error).__name__}: {error}")
                        continue
                    self._requeue([item])
                    self._worker_died(position)
                    break
                if not worker.inflight:
                    worker.head_started = time.monotonic()
                worker.inflight.append((task_id, item))

    def _deadline(self, worker: _Worker) -> float | None:
        if not worker.ready:
            return worker.started + _STARTUP_TIMEOUT_S
        return worker.head_started + self.timeout_s if worker.inflight else None

    def _wait_and_collect(self) -> None:
        deadlines = [d for w in self._workers if (d := self._deadline(w)) is not None]
        wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        watched = [w.receiver for w in self._workers if not w.ready or w.inflight]
        ready = set(multiprocessing.connection.wait([self._wake_reader, *watched], timeout=wait_s))
        if self._wake_reader in ready:
            while self._wake_reader.poll():
                self._wake_reader.recv_bytes()
        for position, worker in enumerate(self._workers):
            if worker.receiver in ready:
                try:
                    while True:  # drain every reply already in the pipe
                        self._handle(worker, worker.receiver.recv())
                        if not (worker.inflight and worker.receiver.poll()):
                            break
                except (EOFError, OSError):  # the pipe closed: the worker died
                    self._worker_died(position)
                    continue
            deadline = self._deadline(worker)
            if deadline is not None and time.monotonic() >= deadline:
                if not worker.ready:
                    raise RuntimeError(f"verifier worker did not start in {_STARTUP_TIMEOUT_S:g}s")
                _, item = worker.inflight.popleft()
                self._fail(item, "timeout", f"timeout after {self.timeout_s:g}s")
                self._requeue([queued for _, queued in worker.inflight])
                self._replace(position)

    def _handle(self, worker: _Worker, message) -> None:
        if not worker.ready:
            if message != READY:
                raise RuntimeError(f"verifier worker sent {message!r} before ready")
            worker.ready = True
            return
        task_id, item = worker.inflight.popleft()
        worker.head_started = time.monotonic()
        got_id, ok, value = message
        if got_id != task_id:
            raise RuntimeError(f"verifier worker replied to task {got_id}, expected {task_id}")
        if ok:
            item.batch.finish(item.index, value)
        else:
            self._fail(item, "error", f"error: {value}")

    def _worker_died(self, position: int) -> None:
        worker = self._workers[position]
        try:
            code = worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = "unknown"
        if not worker.ready:
            raise RuntimeError(
                f"verifier worker failed to start (exit code {code}); run "
                "`python -m polaris_jax.rewards.worker` to see the import error"
            )
        if worker.inflight:
            _, item = worker.inflight.popleft()
            self._fail(item, "crashed", f"worker crashed (exit code {code})")
            self._requeue([queued for _, queued in worker.inflight])
        else:
            logger.warning("verifier worker exited while idle (exit code %s)", code)
        self._replace(position)

    def _requeue(self, items: list[_Item]) -> None:
        with self._lock:
            self._pending.extendleft(reversed(items))

    def _replace(self, position: int) -> None:
        self._workers[position].inflight.clear()
        self._workers[position].stop()
        self._workers[position] = _Worker(self._memory_limit_mb)

    def _fail(self, item: _Item, kind: str, reason: str) -> None:
        self.failures[kind] += 1
        logger.warning("verifier item scored as failure: %s", reason)
        item.batch.finish(item.index, item.batch.on_failure(reason))

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            items, self._pending = list(self._pending), collections.deque()
        items += [item for worker in self._workers for _, item in worker.inflight]
        for batch in {id(item.batch): item.batch for item in items}.values():
            if not batch.future.done():
                batch.future.set_exception(RuntimeError(reason))


def _failed_score(reason: str) -> scoring.Score:
    return scoring.Score(0.0, reason)


_default_pool: VerifierPool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide VerifierPool behind `math_reward`, started on first use."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None or _default_pool.closed:
            _default_pool = VerifierPool()
            atexit.register(_default_pool.close)
        return _default_pool


def math_reward(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer (last box, after `</think>`) equals `gold`, else 0.0.

    Runs in the shared verifier pool: a worker that hangs or crashes is replaced and the
    item scores 0.0, so this always returns within the pool's per-item timeout.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}")
    return default_pool().score([completion], [gold])[0].reward
