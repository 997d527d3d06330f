"""Distinct-N on hand examples and the temperature search rule."""

from __future__ import annotations

import pytest

from polaris_jax.train import rl
from polaris_jax.train.rl.diversity import TemperatureScan, choose_temperature


def test_distinct_4_by_hand():
    assert rl.distinct_4([[1, 2, 3, 4, 5]]) == 1.0  # (1234), (2345): 2 unique / 2
    assert rl.distinct_4([[1, 2, 3, 4], [1, 2, 3, 4]]) == 0.5  # 1 unique / 2
    assert rl.distinct_4([[1, 1, 1, 1, 1, 1]]) == pytest.approx(1 / 3)  # (1111) x 3
    # 4-grams never span two responses: [1,2] + [3,4] has none.
    assert rl.distinct_4([[1, 2], [3, 4]]) == 0.0
    assert rl.distinct_4([[1, 2, 3, 4, 5], [9, 1, 2, 3, 4]]) == pytest.approx(3 / 4)
    assert rl.distinct_n([[1, 2, 1, 2]], n=2) == pytest.approx(2 / 3)


def test_group_distinct_averages_per_prompt():
    responses = [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [8, 7, 6, 5]]
    assert rl.group_distinct_n(responses, group_size=2) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="groups of 3"):
        rl.group_distinct_n(responses, group_size=3)


def _scan(t, diversity, accuracy):
    return TemperatureScan(temperature=t, diversity=diversity, accuracy=accuracy, num_responses=8)


def test_choose_temperature_rule():
    scans = [
        _scan(0.6, 0.30, 0.70),
        _scan(1.0, 0.45, 0.72),  # best accuracy
        _scan(1.2, 0.60, 0.70),
        _scan(1.4, 0.70, 0.69),
        _scan(1.6, 0.85, 0.50),  # collapse
    ]
    chosen, rule = choose_temperature(scans, accuracy_tolerance=0.03)
    assert chosen == 1.4 and "highest" in rule
    chosen, _ = choose_temperature(scans, accuracy_tolerance=0.03, diversity_target=0.6)
    assert chosen == 1.2
    chosen, rule = choose_temperature(scans, accuracy_tolerance=0.03, diversity_target=0.8)
    assert chosen == 1.4 and "none reached" in rule


def test_search_temperature_calls_sampler_per_temperature():
    def sample(temperature):
        # Higher temperature: the two samples of each prompt diverge more, accuracy drops late.
        second = [1, 2, 3, 4, 5] if temperature < 1.0 else [9, 8, 7, 6, 5]
        responses = [[1, 2, 3, 4, 5], second] * 2
        correct = [True, temperature < 1.5, True, temperature < 1.5]
        return responses, correct

    result = rl.search_temperature(sample, [0.6, 1.0, 1.5], group_size=2)
    assert [s.diversity for s in result.scans] == [0.5, 1.0, 1.0]
    assert [s.accuracy for s in result.scans] == [1.0, 1.0, 0.5]
    assert result.chosen_temperature == 1.0
    with pytest.raises(ValueError, match="correctness flags"):
        rl.search_temperature(lambda t: ([[1]], []), [1.0], group_size=1)
