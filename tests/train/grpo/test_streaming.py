"""Streaming rollouts on one long-lived engine (`train/grpo/streaming.py`): a response running across a
weight push keeps its earlier tokens' versions and logprobs (and the off-policy weights use them), the
partial-rollout cap defers a push instead of mixing versions, zero-variance groups are dropped on
arrival and replaced by new prompts, and admission stays within the staleness bound."""

from __future__ import annotations

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.data.problems import Problem
from polaris_jax.rewards.scoring import Score
from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.engine_settings import EngineSettings
from polaris_jax.sampling.requests import Request, to_sample_output
from polaris_jax.train.grpo.streaming import StreamingRollouts
from polaris_jax.train.rl.importance import apply_off_policy
from tests.sampling.conftest import golden


@pytest.fixture(scope="module")
def tied():
    return golden("qwen3_tied")


SETTINGS = EngineSettings(max_slots=8, num_pages=96, page_size=8, max_seq_len=128, prefill_chunk=16, decode_block=1)
RESPONSE = 48


class _Tokenizer:
    def decode(self, ids):
        return " ".join(map(str, ids))


class _Pool:
    """Scores a group by its stream position: `correct(position, sample)` (the verifier is not under test)."""

    def __init__(self, correct):
        self.correct = correct

    def score_async(self, texts, golds):
        future = concurrent.futures.Future()
        position = int(golds[0])
        future.set_result([Score(float(self.correct(position, j)), "stub") for j in range(len(texts))])
        return future


def _problem(position: int) -> Problem:
    return Problem(id=f"p{position}", prompt_ids=(3 + position % 7, 11, 12, 13), answer=str(position))


def _request(group, n=2, max_new_tokens=RESPONSE) -> Request:
    return Request(
        prompt=list(group.problem.prompt_ids),
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        n=n,
        seed=group.position,
        id=group.position,
    )


def _producer(model, params, *, cap=2, staleness=2, in_flight=1, per_step=1, pool=None, keep=None, request=_request):
    engine = Engine(model.config, params, SETTINGS, version=0)
    return StreamingRollouts(
        engine,
        problem_at=_problem,
        request_for=request,
        position=0,
        first_step=0,
        groups_per_step=per_step,
        tokenizer=_Tokenizer(),
        pool=pool or _Pool(lambda position, j: j % 2),
        max_in_flight=in_flight,
        max_steps_per_response=cap,
        max_staleness=staleness,
        keep=keep,
    )


def _push_mid_response(producer, params) -> int:
    """Pauses the engine once the first group has some tokens, pushes version 1, resumes; returns the
    tokens each sample had at the push."""
    while not (0 in producer._in_engine and all(c.tokens for c in producer.engine.progress(0))):
        pass
    producer.pause()
    before = min(len(c.tokens) for c in producer.engine.progress(0))
    producer.push(params, 1)
    producer.resume()
    return before


def test_a_response_running_across_a_push_keeps_its_versions_and_logprobs(tied):
    new_params = jax.tree.map(lambda p: p * 1.3, tied.params)
    producer = _producer(tied, tied.params, cap=2)
    try:
        before = _push_mid_response(producer, new_params)
        (group,), counters = producer.take(1, 1)
    finally:
        producer.close()
    assert 0 < before < RESPONSE, "the push must land mid-response for this test to mean anything"
    reference = Engine(tied.config, tied.params, SETTINGS).run([_request(group)])[0]  # version 0 only
    for got, want in zip(group.completions, reference):
        k = got.versions.index(1)  # the first token the new weights sampled
        assert k >= before and set(got.versions[:k]) == {0} and set(got.versions[k:]) == {1}
        assert got.tokens[:k] == want.tokens[:k]
        np.testing.assert_allclose(got.logprobs[:k], want.logprobs[:k], rtol=1e-5, atol=1e-5)
    assert counters["pushes"] == 1
    # The batch carries the behaviour logprobs token by token, and TIS weighs each token by them.
    out = to_sample_output([group.completions], RESPONSE)
    mask_bt = (np.arange(RESPONSE)[None] < out.lengths_b[:, None]).astype(np.float32)
    learner_bt = out.logprobs_br + np.float32(0.5) * mask_bt  # any learner logprobs
    loss_bt, metrics = apply_off_policy(
        jnp.ones_like(learner_bt), jnp.asarray(learner_bt), jnp.asarray(out.logprobs_br), mask_bt, "tis", 1.2
    )
    np.testing.assert_allclose(np.asarray(loss_bt)[mask_bt > 0], 1.2)  # min(exp(0.5), 1.2)
    assert float(metrics["off_policy_clipped_fraction"]) == pytest.approx(1.0)


def test_the_cap_defers_a_push_until_the_running_response_ends(tied):
    new_params = jax.tree.map(lambda p: p * 1.3, tied.params)
    producer = _producer(tied, tied.params, cap=1, staleness=1, in_flight=2, per_step=1)
    try:
        _push_mid_response(producer, new_params)
        (first, first_counters), (second, second_counters), (third, third_counters) = (
            producer.take(1, 1) for _ in range(3)
        )
    finally:
        producer.close()
    assert set(first[0].versions) == {0}, "a cap of 1 mixes no versions in a response"
    assert set(second[0].versions) == {0} and set(third[0].versions) == {1}
    assert first_counters.get("pushes", 0) + second_counters.get("pushes", 0) + third_counters.get("pushes", 0) == 1
    assert first_counters.get("pushes_deferred_steps", 0) + second_counters.get("pushes_deferred_steps", 0) > 0


def test_zero_variance_groups_are_dropped_on_arrival_and_replaced(tied):
    # Even positions: both samples right; odd: one right, one wrong (informative).
    pool = _Pool(lambda position, j: 1 if position % 2 == 0 else j % 2)
    keep = lambda group: len({s.reward for s in group.scores}) > 1  # noqa: E731
    short = lambda group: _request(group, max_new_tokens=4)  # noqa: E731
    producer = _producer(tied, tied.params, in_flight=2, per_step=2, pool=pool, keep=keep, request=short)
    try:
        groups, counters = producer.take(0, 2)
    finally:
        producer.close()
    assert sorted(g.position % 2 for g in groups) == [1, 1]
    assert counters["dropped_uninformative"] >= 2 and counters["admitted"] >= 4


def test_admission_stops_at_what_the_learner_takes_within_the_staleness_bound(tied):
    short = lambda group: _request(group, max_new_tokens=4)  # noqa: E731
    producer = _producer(tied, tied.params, staleness=1, in_flight=100, per_step=3, request=short)
    try:
        producer.take(0, 3)
        producer.pause()  # idle: nothing more may be admitted without a push
        # (version 0 + k 1 - next step 0 + 1) x 3 groups before the take; after it, only the 3 still held.
        assert producer.position == 6
    finally:
        producer.close()
