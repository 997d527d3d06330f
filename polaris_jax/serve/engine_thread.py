"""The one thread that owns the `Engine` (which is single-threaded) and serves it to asyncio routes.

    thread = EngineThread(engine)           # warms the engine up in its own thread, then steps it
    thread.start(); thread.ready.wait()
    stream = await thread.submit(request)   # RequestError / QueueFull raised here, before any token
    async for delta in stream: ...          # each `Delta` of the request; ends when every sample ends
    thread.abort(request.id)                # e.g. on a client disconnect or a stop string (idempotent)

The thread takes submissions and aborts from a thread-safe inbox, steps the engine while it is busy,
and hands each delta to the request's asyncio queue with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time

from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.requests import Delta, Request

_ACCEPTED, _END = "accepted", "end"


class EngineStopped(RuntimeError):
    """The engine thread is not serving (it failed or was closed)."""


class RequestStream:
    """The deltas of one submitted request, as an async iterator; `close()` aborts what is left."""

    def __init__(self, owner: EngineThread, request_id, inbox: asyncio.Queue):
        self.owner, self.request_id, self._inbox, self.done = owner, request_id, inbox, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if self.done:
            raise StopAsyncIteration
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item == _END:
            self.done = True
            raise StopAsyncIteration
        return item

    async def next_within(self, timeout: float) -> Delta | None:
        """The next delta, or None when nothing came within `timeout` seconds (StopAsyncIteration at the end)."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        """Aborts the request (if it still runs) and ends this stream for whoever waits on it."""
        if not self.done:
            self.done = True
            self.owner.abort(self.request_id)
            self._inbox.put_nowait(_END)


async def merge(streams: list[RequestStream], is_disconnected=None, poll_s: float = 1.0):
    """Yields (stream index, delta) from all streams as they come. Every stream is closed (its request
    aborted if it still runs) when this ends: done, an error, the consumer stopping, or `is_disconnected()`."""
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                inbox.put_nowait((i, delta))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            inbox.put_nowait(e)
        finally:
            inbox.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    live, checked = len(streams), time.monotonic()
    try:
        while live:
            try:
                item = await asyncio.wait_for(inbox.get(), poll_s)
            except TimeoutError:
                item = None
            if is_disconnected is not None and time.monotonic() - checked >= poll_s:
                if await is_disconnected():
                    return
                checked = time.monotonic()
            if item is None:
                continue
            if isinstance(item, Exception):
                raise item
            if item[1] is None:
                live -= 1
            else:
                yield item
    finally:
        for stream in streams:
            stream.close()
        for task in tasks:
            task.cancel()


class EngineThread:
    def __init__(self, engine: Engine, *, warmup: bool = True):
        self.engine = engine
        self.ready = threading.Event()  # set once the engine is warm (or the thread has failed)
        self.error: BaseException | None = None
        self._warmup = warmup
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict = {}  # request id -> a callable that delivers one item to its asyncio queue
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="polaris-engine", daemon=True)

    @property
    def healthy(self) -> bool:
        return self.ready.is_set() and self.error is None and not self._closed

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout)

    # ----- asyncio side -----

    async def submit(self, request: Request) -> RequestStream:
        """Queues `request`; returns its stream once the engine accepted it (else raises its error)."""
        if not self.healthy:
            raise EngineStopped(f"the engine is not serving: {self.error or 'not ready'}")
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def deliver(item):
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        self._inbox.put(("submit", request, deliver))
        stream = RequestStream(self, request.id, inbox)
        first = await inbox.get()
        if isinstance(first, BaseException):
            stream.done = True
            raise first
        assert first == _ACCEPTED, first
        return stream

    async def submit_all(self, requests: list[Request]) -> list[RequestStream]:
        """Submits each request; if one is refused, aborts those already accepted and raises its error."""
        streams = []
        try:
            for request in requests:
                streams.append(await self.submit(request))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    def abort(self, request_id) -> None:
        self._inbox.put(("abort", request_id, None))

    def call(self, fn) -> concurrent.futures.Future:
        """Runs fn(engine) on the engine's thread between two steps (e.g. new weights); the future holds its
        result or error."""
        if not self.healthy:
            raise EngineStopped(f"the engine is not serving: {self.error or 'not ready'}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, future))
        return future

    # ----- the engine thread -----

    def _run(self) -> None:
        try:
            if self._warmup:
                self.engine.warmup()
        except BaseException as e:  # noqa: BLE001 - reported through /health and every submit
            logging.exception("engine warmup failed")
            self.error = e
        finally:
            self.ready.set()
        while not self._closed and self.error is None:
            self._take(block=not self.engine.busy)
            if self.engine.busy:
                self._step()
        for deliver in self._sinks.values():
            deliver(EngineStopped("the engine stopped"))
        self._sinks.clear()
        while True:  # what came in after the last step waits no longer
            try:
                kind, _, deliver = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "call":
                deliver.set_exception(EngineStopped("the engine stopped"))
            elif kind == "submit":
                deliver(EngineStopped("the engine stopped"))

    def _take(self, block: bool) -> None:
        """Applies every waiting submission and abort (waiting briefly for one when the engine is idle)."""
        while True:
            try:
                kind, payload, deliver = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if kind == "submit":
                try:
                    self.engine.submit(payload)
                except Exception as e:  # noqa: BLE001 - RequestError, QueueFull: the route maps them
                    deliver(e)
                    continue
                self._sinks[payload.id] = deliver
                deliver(_ACCEPTED)
            elif kind == "call":
                try:
                    deliver.set_result(payload(self.engine))
                except Exception as e:  # noqa: BLE001 - the caller's to handle
                    deliver.set_exception(e)
            elif kind == "abort" and payload in self._sinks:
                del self._sinks[payload]
                logging.info("aborting request %s", payload)
                self.engine.abort(payload)  # a sink is removed when its request is popped: it is known

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except BaseException as e:  # noqa: BLE001 - every request in flight learns of it
            logging.exception("engine step failed")
            self.error = e
            for deliver in self._sinks.values():
                deliver(EngineStopped(f"the engine failed: {e!r}"))
            self._sinks.clear()
            return
        ended = set()
        for delta in deltas:
            deliver = self._sinks.get(delta.request_id)
            if deliver is not None:
                deliver(delta)
                if delta.finish_reason is not None:
                    ended.add(delta.request_id)
        for request_id in ended:
            if self.engine.finished(request_id):
                self.engine.pop_finished(request_id)
                self._sinks.pop(request_id)(_END)
