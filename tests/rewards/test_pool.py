"""The verifier pool: per-item timeouts, crash recovery, async batches, threads, bad input."""

import os
import threading
import time

import pytest

from polaris_jax.rewards import Score, VerifierPool

pytestmark = pytest.mark.timeout(180)


def test_scores_come_back_in_order(pool):
    completions = [r"\boxed{\frac{1}{2}}", r"\boxed{3}", "no answer", r"\boxed{2"]
    scores = pool.score(completions, ["0.5", "4", "1", "2"])
    assert [s.reward for s in scores] == [1.0, 0.0, 0.0, 0.0]
    assert scores[0].answer == r"\frac{1}{2}"
    assert scores[2].reason == "no_answer"
    assert scores[3].reason == "unbalanced_box"


def test_hung_item_times_out_and_the_pool_keeps_working():
    with VerifierPool(num_workers=2, timeout_s=1.0) as small_pool:
        results = small_pool.map_async(time.sleep, [(60,), (0,)], on_failure=lambda reason: reason).result(timeout=60)
        assert results[0].startswith("timeout after 1s")
        assert results[1] is None
        assert small_pool.failures["timeout"] == 1
        assert small_pool.score([r"\boxed{7}"], ["7"])[0].reward == 1.0


def test_crashed_worker_is_replaced_and_its_item_scores_the_failure_value(pool):
    results = pool.map_async(os._exit, [(3,)], on_failure=lambda reason: reason).result(timeout=60)
    assert results == ["worker crashed (exit code 3)"]
    assert pool.score([r"\boxed{7}", r"\boxed{8}"], ["7", "8"]) == [
        Score(1.0, "boxed: string_match", "7"),
        Score(1.0, "boxed: string_match", "8"),
    ]


def test_raising_item_is_reported_not_fatal(pool):
    results = pool.map_async(int, [("not a number",), ("12",)], on_failure=lambda reason: reason).result(timeout=60)
    assert results[0].startswith("error: ValueError")
    assert results[1] == 12


def test_score_async_returns_before_the_work_is_done(pool):
    future = pool.map_async(time.sleep, [(1.0,)], on_failure=lambda reason: reason)
    assert not future.done()
    assert future.result(timeout=60) == [None]


def test_usable_from_a_non_main_thread(pool):
    # math-verify's signal.alarm timeout fails off the main thread (verl scored everything 0).
    results = []
    worker = threading.Thread(target=lambda: results.extend(pool.score([r"\boxed{0.25}"], [r"\frac14"])))
    worker.start()
    worker.join(timeout=60)
    assert [s.reward for s in results] == [1.0]


def test_bad_input_is_rejected_with_a_clear_error(pool):
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        pool.score_async(["a", "b"], ["1"])
    with pytest.raises(TypeError, match="item 0"):
        pool.score_async([r"\boxed{1}"], [1])
    with pytest.raises(ValueError, match="gold answer is empty"):
        pool.score_async([r"\boxed{1}"], ["  "])
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierPool(num_workers=1, timeout_s=0)


def test_closed_pool_refuses_work_and_fails_pending_batches():
    small_pool = VerifierPool(num_workers=1, timeout_s=30.0)
    pending = small_pool.map_async(time.sleep, [(30,), (30,)], on_failure=lambda reason: reason)
    small_pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pending.result(timeout=30)
    with pytest.raises(RuntimeError, match="closed"):
        small_pool.score([r"\boxed{1}"], ["1"])


def test_unpicklable_item_fails_alone(pool):
    results = pool.map_async(len, [([1, 2],), (lambda: 0,)], on_failure=lambda reason: reason).result(timeout=60)
    assert results[0] == 2
    assert results[1].startswith("could not pickle item")


def test_items_queued_behind_a_killed_worker_are_retried_not_failed():
    with VerifierPool(num_workers=1, timeout_s=1.0) as small_pool:
        # the sleep is killed at its timeout; the small items sent ahead of time must still run
        results = (
            small_pool.map_async(abs, [(-1,), (-2,)], on_failure=lambda reason: reason),
            small_pool.map_async(time.sleep, [(30,)], on_failure=lambda reason: reason),
        )
        later = small_pool.map_async(abs, [(-i,) for i in range(20)], on_failure=lambda reason: reason)
        assert results[0].result(timeout=60) == [1, 2]
        assert results[1].result(timeout=60)[0].startswith("timeout")
        assert later.result(timeout=60) == list(range(20))


def test_pool_created_in_a_short_lived_thread_keeps_its_workers():
    holder = []
    creator = threading.Thread(target=lambda: holder.append(VerifierPool(num_workers=1, timeout_s=30.0)))
    creator.start()
    creator.join()
    with holder[0] as created_pool:
        results = created_pool.map_async(time.sleep, [(0.5,)], on_failure=lambda reason: reason).result(timeout=60)
        assert results == [None]
        assert not created_pool.failures
