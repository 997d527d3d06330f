"""Tinker futures: every train and sample call answers `{request_id}` at once; its result comes later.

    futures = Futures(store)
    request_id = futures.create("forward_backward")          # in an async route
    futures.finish(request_id, "done", PROTO, payload)         # from any thread
    status, content_type, payload = await futures.wait(request_id, 30.0)   # the long poll

A result is written to the store, so it outlives the process, and the newest `keep_in_memory` results
are also kept in memory; `wait` returns
("pending", ...) if nothing came within the timeout (the route then answers `try_again`).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import json
import logging
import threading
import time
import uuid

from polaris_jax.serve.store import FutureRow, Store

JSON, PROTO = "application/json", "application/x-protobuf"
HTTP_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("http_request_id", default=None)


class Futures:
    def __init__(self, store: Store, keep_in_memory: int = 4096):
        self.store, self.keep_in_memory = store, keep_in_memory
        self._lock = threading.Lock()
        self._done: collections.OrderedDict[str, tuple[str, str, bytes]] = collections.OrderedDict()
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}

    def create(self, kind: str) -> str:
        request_id = f"{kind}-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        with self._lock:
            self._waiters[request_id] = (loop, loop.create_future())
        self.store.put(FutureRow(request_id=request_id, kind=kind, status="pending", created=time.time()))
        logging.info(json.dumps({"request_id": HTTP_REQUEST_ID.get(), "future": request_id, "kind": kind}))
        return request_id

    def finish(self, request_id: str, status: str, content_type: str, payload: bytes) -> None:
        self.store.finish_future(request_id, status, content_type, payload)
        with self._lock:
            self._done[request_id] = (status, content_type, payload)
            while len(self._done) > self.keep_in_memory:  # older results are read back from the store
                self._done.popitem(last=False)
            loop, fut = self._waiters.pop(request_id, (None, None))
        if fut is not None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

    def succeed_json(self, request_id: str, obj) -> None:
        self.finish(request_id, "done", JSON, json.dumps(obj).encode())

    def fail(self, request_id: str, error: str, category: str) -> None:
        self.finish(request_id, "failed", JSON, json.dumps({"error": error, "category": category}).encode())

    async def wait(self, request_id: str, timeout: float) -> tuple[str, str, bytes] | None:
        """The outcome, ("pending", "", b"") after `timeout`, or None for an id never issued."""
        with self._lock:
            done = self._done.get(request_id)
            waiter = self._waiters.get(request_id)
        if done is not None:
            return done
        if waiter is not None:
            try:
                await asyncio.wait_for(asyncio.shield(waiter[1]), timeout)
            except TimeoutError:
                return "pending", "", b""
            with self._lock:
                done = self._done.get(request_id)
            if done is not None:
                return done
        row = self.store.get(FutureRow, request_id)  # a result from before a restart
        if row is None:
            return None
        return row.status, row.content_type, row.payload
