"""The verifier worker process: `python -m polaris_jax.rewards.worker READ_FD WRITE_FD [MB]`.

Started by VerifierPool as a fresh interpreter (not a fork of the multithreaded JAX parent,
and not a multiprocessing child, which would re-run the caller's `__main__`). It imports the
scorer, says it is ready, then runs (task_id, fn, args) messages one at a time, in order,
answering each with (task_id, ok, value-or-error-text).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection


def serve(conn) -> None:
    """Answer messages until the pipe closes: 8 bytes of task id, then pickled (fn, args)."""
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        task_id = int.from_bytes(message[:8], "little")
        try:
            fn, args = pickle.loads(message[8:])
            reply = (task_id, True, fn(*args))
        except BaseException as error:  # report anything the item raises, never die of it
            reply = (task_id, False, f"{type(error).__name__}: {str(error)[:200]}")
        try:
            conn.send(reply)
        except Exception as error:  # e.g. an unpicklable result
            conn.send((task_id, False, f"unsendable result: {type(error).__name__}"))


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        raise SystemExit("usage: python -m polaris_jax.rewards.worker READ_FD WRITE_FD [MEMORY_MB]")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool decides when workers stop
    _die_with_parent()
    reader = Connection(int(argv[0]), writable=False)
    writer = Connection(int(argv[1]), readable=False)
    from polaris_jax.rewards.pool import READY  # imports the scorer: the slow part

    if len(argv) == 3 and int(argv[2]) > 0:
        import resource

        limit = int(argv[2]) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    writer.send(READY)
    serve(_Duplex(reader, writer))


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL us if the pool's process dies, even mid-item.

    (Strictly: when the thread that started us exits; the pool starts workers from its
    dispatcher thread, which lives as long as the pool.)
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # best effort; EOF on the pipe still stops an idle worker
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class _Duplex:
    """One object with recv/send over two one-way pipes."""

    def __init__(self, reader: Connection, writer: Connection):
        self.recv_bytes = reader.recv_bytes
        self.send = writer.send


if __name__ == "__main__":
    main(sys.argv[1:])
