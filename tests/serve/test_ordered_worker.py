"""The trainer's worker: each client's requests in seq_id order, skipped ids passed over, and requests of
different clients that are next in their order and share a key run as one call (multi-LoRA)."""

from __future__ import annotations

import threading

from polaris_jax.serve.ordered_worker import OrderedWorker


def _blocked(worker):
    """Holds the worker's thread until the returned event is set, so requests queue up meanwhile."""
    started, release = threading.Event(), threading.Event()
    worker.submit_now(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    return release


def _drain(worker):
    done = threading.Event()
    worker.submit_now(done.set)
    assert done.wait(10)


def test_requests_run_in_seq_order_and_equal_keys_run_together():
    calls, lock = [], threading.Lock()

    def record(what):
        with lock:
            calls.append(what)

    worker = OrderedWorker(run_together=lambda items: record(("together", tuple(items))))
    try:
        release = _blocked(worker)
        worker.submit("a", 2, lambda: record("a2"), together=("fb", "a2"))
        worker.submit("a", 1, lambda: record("a1"), together=("fb", "a1"))
        worker.submit("b", 1, lambda: record("b1"), together=("fb", "b1"))
        worker.submit("c", 1, lambda: record("c1"), together=("other", "c1"))  # another loss: alone
        worker.skip("d", 1)  # refused at submit: d's next request is seq 2
        worker.submit("d", 2, lambda: record("d2"), together=("fb", "d2"))
        worker.submit("e", 1, lambda: record("e1"))  # no key: alone
        worker.submit("f", 2, lambda: record("f2"), together=("fb", "f2"))  # waits for f's seq 1
        release.set()
        _drain(worker)
        worker.submit("f", 1, lambda: record("f1"), together=("fb", "f1"))
        _drain(worker)
    finally:
        worker.close()
    assert calls[0] == ("together", ("a1", "b1", "d2"))  # one per client, each the next in its order
    assert sorted(calls[1:4]) == ["a2", "c1", "e1"]  # a2 has no partner left; c1 and e1 run alone
    assert calls[4:] == ["f1", "f2"]  # f2 waited for f1


def test_a_gap_that_never_fills_is_passed_after_the_timeout():
    ran = threading.Event()
    worker = OrderedWorker(gap_timeout_s=0.2)
    try:
        worker.submit("a", 3, ran.set)  # seq 1 and 2 were lost on the way
        assert ran.wait(5)
    finally:
        worker.close()
