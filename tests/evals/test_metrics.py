"""Metrics against independent references: Chen et al.'s pass@k formula via math.comb."""

import itertools
import math

import numpy as np
import pytest

from polaris_jax.evals import avg_at_n, cons_at_n, group_answers, majority_index, pass_at_k, summarize
from polaris_jax.rewards import answers_equivalent


def chen_pass_at_k(n, c, k):
    # Chen et al. 2021, eq. 1: 1 - C(n-c, k) / C(n, k), with C(m, k) = 0 for m < k
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64])
def test_pass_at_k_matches_the_published_formula(n):
    for c, k in itertools.product(range(n + 1), range(1, n + 1)):
        assert pass_at_k(n, c, k) == pytest.approx(chen_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_stays_finite():
    assert pass_at_k(1024, 3, 256) == pytest.approx(chen_pass_at_k(1024, 3, 256), rel=1e-9)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(32, 12, 1) == pytest.approx(12 / 32)


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (4.5, 2, 1)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_n():
    assert avg_at_n(np.array([[1, 0, 0, 0], [1, 1, 1, 1]])) == pytest.approx(5 / 8)
    with pytest.raises(ValueError):
        avg_at_n(np.array([1, 0]))


def in_process_equivalence(pairs):
    return [answers_equivalent(a, b).equal for a, b in pairs]


def test_cons_at_n_groups_answers_by_mathematical_equivalence():
    # exact strings would elect "2" (two votes); by value 1/2 has three
    answers = [[r"\frac{1}{2}", "2", "0.5", "2", r"\dfrac12", None]]
    correct = np.array([[1, 0, 1, 0, 1, 0]])
    labels = group_answers(answers, in_process_equivalence)
    assert labels[0][0] == labels[0][2] == labels[0][4] != labels[0][1] == labels[0][3]
    assert labels[0][5] is None
    assert cons_at_n(correct, labels) == 1.0
    exact = [[a if a is None else {"0.5": 0, r"\frac{1}{2}": 1, r"\dfrac12": 2, "2": 3}[a] for a in answers[0]]]
    assert cons_at_n(correct, exact) == 0.0  # Fathom-style exact-string voting gets it wrong


def test_cons_at_n_ties_go_to_the_group_seen_first_and_no_answer_is_wrong():
    assert majority_index([1, 0, 0, 1]) == 0
    assert majority_index([None, None]) is None
    assert cons_at_n(np.array([[0, 0]]), [[None, None]]) == 0.0


def test_group_answers_asks_once_for_all_problems():
    calls = []

    def record(pairs):
        calls.append(list(pairs))
        return in_process_equivalence(pairs)

    labels = group_answers([["1", "1.0", "2"], ["x", "x"]], record)
    assert len(calls) == 1 and len(calls[0]) == 3  # (1, 1.0), (1, 2), (1.0, 2); "x" twice needs no call
    assert labels == [[0, 0, 2], [0, 0]]


def test_summarize_reports_every_metric():
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0]])
    labels = [[0, 1, 1, 2], [0, 0, 2, 3]]
    tokens = np.array([[10, 20, 30, 40], [50, 60, 70, 80]])
    truncated = np.array([[0, 0, 0, 1], [0, 0, 1, 1]])
    metrics = summarize(correct, labels, tokens, truncated)
    assert metrics["avg@4"] == pytest.approx(3 / 8)
    assert metrics["pass@1"] == pytest.approx(3 / 8)
    assert metrics["pass@2"] == pytest.approx((chen_pass_at_k(4, 1, 2) + chen_pass_at_k(4, 2, 2)) / 2)
    assert metrics["pass@4"] == 1.0
    assert metrics["cons@4"] == pytest.approx(0.5)  # problem 0 elects the wrong pair, problem 1 the right one
    assert metrics["mean_response_tokens"] == 45.0
    assert metrics["truncation_rate"] == pytest.approx(3 / 8)
