"""Hostile completions: each returns a score (0, or the right one) within 10 s, and a pool
scoring 1,000 of them finishes (every wait here is bounded, so a hang fails the test)."""

import pytest

from polaris_jax.rewards import math_reward

pytestmark = pytest.mark.timeout(300)

FIVE_HUNDRED_BOXES = r"\boxed{7} " * 499 + r"\boxed{42}"
ONE_MEGABYTE = "x" * 1_000_000
UNCLOSED = r"\boxed{" * 2000

HOSTILE = [
    # (completion, gold, right score)
    (FIVE_HUNDRED_BOXES, "42", 1.0),
    (FIVE_HUNDRED_BOXES, "7", 0.0),
    (ONE_MEGABYTE + r" \boxed{42}", "42", 1.0),
    (ONE_MEGABYTE, "42", 0.0),
    (r"\boxed{" + ONE_MEGABYTE + "}", "42", 0.0),
    (r"\boxed{9^{9^{9^{9}}}}", "5", 0.0),
    (r"\boxed{2^{2^{30}}}", "5", 0.0),
    (r"\boxed{(10^{10})!}", "5", 0.0),
    (r"\boxed{9!!!!}", "5", 0.0),
    (UNCLOSED, "3", 0.0),
    (UNCLOSED + "3}", "3", 0.0),  # the last box closes, 1,999 others do not
    (r"\boxed{\frac{1}{0}}", "3", 0.0),
    (r"\boxed{1/0}", "3", 0.0),
    (r"\boxed{0/0}", "0", 0.0),
]


@pytest.mark.parametrize("index", range(len(HOSTILE)))
def test_each_hostile_output_scores_within_ten_seconds(pool, index):
    completion, gold, expected = HOSTILE[index]
    [score] = pool.score_async([completion], [gold]).result(timeout=10)
    assert score.reward == expected, score.reason


def test_contract_function_on_hostile_outputs():
    # math_reward runs in the shared default pool; the first call starts it.
    assert math_reward(r"\boxed{9^{9^{9^{9}}}}", "5") == 0.0
    assert math_reward(FIVE_HUNDRED_BOXES, "42") == 1.0
    assert math_reward(UNCLOSED, "3") == 0.0
    assert math_reward(r"\boxed{\frac{1}{0}}", "3") == 0.0


def test_pool_scores_a_thousand_hostile_items_without_hanging(pool):
    items = [HOSTILE[i % len(HOSTILE)] for i in range(1000)]
    scores = pool.score_async([c for c, _, _ in items], [g for _, g, _ in items]).result(timeout=240)
    assert [s.reward for s in scores] == [expected for _, _, expected in items]
