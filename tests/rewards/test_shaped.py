"""Shaped rewards against their published formulas, written out independently here."""

import logging
import math

import numpy as np
import pytest

from polaris_jax.rewards import RewardBatch, combine_rewards, get_reward, register_reward, reward_names
from polaris_jax.rewards.combine import validate_spec


def make_batch(completions, num_tokens, correct, groups=None):
    groups = [0] * len(completions) if groups is None else groups
    return RewardBatch(list(completions), np.array(num_tokens), np.array(correct, float), np.array(groups))


def test_registry_lists_every_shaped_reward():
    assert set(reward_names()) >= {
        "accuracy",
        "format",
        "tag_count",
        "soft_overlong",
        "cosine_length",
        "repetition",
        "kimi_length",
    }
    with pytest.raises(KeyError, match="available"):
        get_reward("nope")


def test_accuracy_is_the_verdict():
    batch = make_batch(["a", "b"], [1, 1], [1.0, 0.0])
    np.testing.assert_array_equal(get_reward("accuracy")(batch), [1.0, 0.0])


def test_format_needs_one_think_block_then_a_boxed_answer():
    completions = [
        "<think>\nwork\n</think>\nSo \\boxed{3}.",  # good
        "<think>work</think> no box",  # no answer
        "work</think> \\boxed{3}",  # no opening tag
        "<think>a</think><think>b</think>\\boxed{3}",  # two blocks
        "<think>work \\boxed{3}",  # never closed
    ]
    batch = make_batch(completions, [1] * 5, [1] * 5)
    np.testing.assert_array_equal(get_reward("format")(batch), [1, 0, 0, 0, 0])
    # a template that forces "<think>\n" means the completion starts inside the block
    np.testing.assert_array_equal(get_reward("format")(batch, think_in_prompt=True), [0, 0, 1, 0, 0])


def test_tag_count_gives_credit_per_tag_used_exactly_once():
    completions = ["<think>\nx\n</think>\ny", "<think>\nx", "<think>\n<think>\n\n</think>\n", "none"]
    batch = make_batch(completions, [1] * 4, [0] * 4)
    np.testing.assert_allclose(get_reward("tag_count")(batch), [1.0, 0.5, 0.5, 0.0])
    open_r1_tags = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
    text = "<think>\na\n</think>\n<answer>\nb\n</answer>"
    np.testing.assert_allclose(get_reward("tag_count")(make_batch([text], [1], [1]), tags=open_r1_tags), [1.0])


def test_soft_overlong_matches_dapo_eq13():
    max_tokens, cache = 100, 20
    lengths = [0, 80, 81, 90, 100, 101, 500]

    def dapo(length):
        if length <= max_tokens - cache:
            return 0.0
        if length <= max_tokens:
            return ((max_tokens - cache) - length) / cache
        return -1.0

    batch = make_batch(["x"] * len(lengths), lengths, [1] * len(lengths))
    got = get_reward("soft_overlong")(batch, max_tokens=max_tokens, cache_tokens=cache)
    np.testing.assert_allclose(got, [dapo(length) for length in lengths], rtol=1e-6)
    with pytest.raises(ValueError, match="cache_tokens"):
        get_reward("soft_overlong")(batch, max_tokens=10, cache_tokens=20)


def test_cosine_length_matches_the_published_schedule():
    lengths, correct = [0, 250, 500, 1000, 2000, 0, 500, 1000], [1, 1, 1, 1, 1, 0, 0, 0]
    max_len, lo_w, hi_w, lo_c, hi_c = 1000, -1.0, -0.5, 0.5, 1.0
    expected = []
    for length, ok in zip(lengths, correct):
        cosine = math.cos(min(length / max_len, 1.0) * math.pi)
        low, high = (lo_c, hi_c) if ok else (hi_w, lo_w)  # Open-R1 swaps min/max for wrong answers
        expected.append(low + 0.5 * (high - low) * (1.0 + cosine))
    batch = make_batch(["x"] * len(lengths), lengths, correct)
    np.testing.assert_allclose(get_reward("cosine_length")(batch, max_tokens=max_len), expected, rtol=1e-6)
    # the endpoints: short & right is best, short & wrong is worst
    assert expected[0] == pytest.approx(1.0) and expected[5] == pytest.approx(-1.0)


def test_repetition_penalty_counts_repeated_ngrams():
    batch = make_batch(["a b a b a b", "one two three four", "A a A a", "hi"], [1] * 4, [1] * 4)
    # "a b a b a b": bigrams ab ba ab ba ab -> 2 unique of 5 -> -(1 - 2/5)
    # "A a A a" lower-cased: aa aa aa -> 1 unique of 3 -> -(1 - 1/3)
    np.testing.assert_allclose(
        get_reward("repetition")(batch, ngram_size=2, max_penalty=-1.0), [-0.6, 0.0, -2 / 3, 0.0], rtol=1e-6
    )
    with pytest.raises(ValueError, match="max_penalty"):
        get_reward("repetition")(batch, max_penalty=0.5)


def test_kimi_length_penalty_is_computed_per_prompt_group():
    lengths = [10, 20, 30, 10, 30, 7, 7]
    correct = [1, 1, 0, 0, 1, 1, 0]
    groups = [0, 0, 0, 1, 1, 2, 2]
    # group 0: min 10 max 30 -> lambda = 0.5, 0, -0.5; group 1: lambda = 0.5, -0.5; group 2: equal lengths
    expected = [0.5, 0.0, -0.5, 0.0, -0.5, 0.0, 0.0]
    batch = make_batch(["x"] * 7, lengths, correct, groups)
    np.testing.assert_allclose(get_reward("kimi_length")(batch), expected)


def test_combine_weights_and_returns_components():
    batch = make_batch(["<think>\nx\n</think>\n\\boxed{1}", "no"], [90, 10], [1, 0])
    spec = {"accuracy": {"weight": 1.0}, "soft_overlong": {"weight": 0.5, "max_tokens": 100, "cache_tokens": 20}}
    total, parts, failures = combine_rewards(batch, spec)
    assert failures == 0
    np.testing.assert_allclose(parts["soft_overlong"], [-0.5, 0.0])
    np.testing.assert_allclose(total, [1.0 - 0.25, 0.0])


def test_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="no weight"):
        validate_spec({"accuracy": {}})
    with pytest.raises(ValueError, match="bad parameters"):
        validate_spec({"accuracy": {"weight": 1.0, "temperature": 2}})
    with pytest.raises(KeyError, match="unknown reward"):
        validate_spec({"acuracy": {"weight": 1.0}})
    with pytest.raises(ValueError, match="shape"):
        RewardBatch(["a"], np.array([1, 2]), np.array([1.0]), np.array([0]))


@register_reward("test_raises_on_seven")
def _raises_on_seven(batch):
    if any("7" in text for text in batch.completions):
        raise RuntimeError("seven is unlucky")
    return np.ones(batch.size, np.float32)


def test_a_reward_that_raises_is_logged_and_scores_zero(caplog):
    texts = ["\\boxed{1}", "\\boxed{7}", "\\boxed{3}", "77"]
    spec = {"accuracy": {"weight": 1.0}, "test_raises_on_seven": {"weight": 0.5}}
    with caplog.at_level(logging.WARNING):
        batch = RewardBatch(texts, np.array([3, 3, 3, 1]), np.array([1.0, 0.0, 1.0, 0.0]), np.array([0, 0, 1, 1]))
        total, parts, failures = combine_rewards(batch, spec)
    np.testing.assert_array_equal(parts["test_raises_on_seven"], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(total, [1.5, 0.0, 1.5, 0.0])
    assert failures == 2
    assert "seven is unlucky" in caplog.text and "test_raises_on_seven" in caplog.text
