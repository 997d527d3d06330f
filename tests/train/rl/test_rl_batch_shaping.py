"""Host-side batch shaping: group stats, DAPO dynamic sampling, Polaris substitution,
overlong filtering and penalty, rollout rescue."""

from __future__ import annotations

import numpy as np
import pytest

from polaris_jax.train import rl

G = 4  # samples per group


def _batch(rewards_gn, t=5):
    rewards_b = np.asarray(rewards_gn, dtype=np.float32).reshape(-1)
    rows = rewards_b.shape[0]
    return {
        "rewards": rewards_b,
        # Each row's tokens encode its (group, sample) so copies can be traced.
        "tokens": np.arange(rows)[:, None] * 100 + np.arange(t)[None, :],
        "mask": np.ones((rows, t), np.int32),
    }


def test_group_stats_by_hand():
    rewards = [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    stats = rl.group_stats(np.asarray(rewards, float).reshape(-1), G)
    assert stats == {
        "reward_mean": 5 / 16,
        "accuracy": 5 / 16,
        "frac_all_correct_groups": 0.25,
        "frac_all_wrong_groups": 0.5,
        "frac_informative_groups": 0.25,
    }


def test_dynamic_sampling_fills_across_rounds_and_trims():
    acc = rl.DynamicSamplingAccumulator(target_groups=3, group_size=G, rewards_key="rewards")
    assert acc.add(_batch([[1, 1, 1, 1], [1, 0, 0, 0]])) == 1
    assert not acc.ready
    assert acc.add(_batch([[0, 0, 0, 0], [0, 0, 0, 0]])) == 0
    assert acc.add(_batch([[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]])) == 2
    assert acc.ready
    batch, stats = acc.pop()
    assert batch["rewards"].shape == (3 * G,)
    kept_gn = batch["rewards"].reshape(3, G)
    assert np.all(kept_gn.max(1) != kept_gn.min(1))  # only informative groups
    # Rows move as whole groups: tokens still match their rewards' group order.
    np.testing.assert_array_equal(kept_gn, [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 1]])
    assert stats["dynamic_sampling_rounds"] == 3 and stats["dynamic_sampling_groups_seen"] == 7
    assert not acc.ready and acc.rounds == 0  # reset for the next step


def test_dynamic_sampling_trims_surplus_and_gives_up_after_max_rounds():
    acc = rl.DynamicSamplingAccumulator(target_groups=1, group_size=G)
    acc.add(_batch([[1, 0, 0, 0], [0, 1, 1, 1]]))
    batch, _ = acc.pop()
    assert batch["tokens"].shape[0] == G and batch["tokens"][0, 0] == 0
    stuck = rl.DynamicSamplingAccumulator(target_groups=2, group_size=G, max_rounds=2)
    stuck.add(_batch([[1, 1, 1, 1]]))
    stuck.add(_batch([[0, 0, 0, 0]]))
    with pytest.raises(RuntimeError, match="2 rounds .* only 0/2 groups"):
        stuck.add(_batch([[0, 0, 0, 0]]))
    with pytest.raises(RuntimeError, match="only 0/2"):
        stuck.pop()


def test_polaris_substitution_copies_informative_groups():
    rewards = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
    batch = _batch(rewards)
    out, info = rl.polaris_substitute(batch, G, np.random.default_rng(0))
    assert not info["skip_step"] and info["num_substituted_groups"] == 3
    assert out["tokens"].shape == batch["tokens"].shape
    out_gn = out["rewards"].reshape(-1, G)
    assert np.all(out_gn.max(1) != out_gn.min(1))
    # Informative groups stay in place; the 3 donors are distinct (3 good groups for 3 bad).
    for g in (0, 2, 5):
        rows = slice(g * G, (g + 1) * G)
        np.testing.assert_array_equal(out["tokens"][rows], batch["tokens"][rows])
    donors = {int(out["tokens"][g * G, 0]) // (100 * G) for g in (1, 3, 4)}
    assert donors == {0, 2, 5}
    np.testing.assert_array_equal(batch["rewards"], np.asarray(rewards, np.float32).reshape(-1))


def test_polaris_substitution_skips_when_a_third_or_less_is_informative():
    batch = _batch([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])  # exactly 1/3 informative
    out, info = rl.polaris_substitute(batch, G, np.random.default_rng(0))
    assert info["skip_step"] and info["num_substituted_groups"] == 0
    np.testing.assert_array_equal(out["rewards"], batch["rewards"])


def test_overlong_filter():
    mask = np.ones((3, 4), np.int32)
    out = rl.overlong_filter_mask(mask, np.array([False, True, False]))
    np.testing.assert_array_equal(out, [[1] * 4, [0] * 4, [1] * 4])


def test_rollout_rescue_swaps_stored_correct_response():
    buffer = rl.RolloutRescueBuffer(group_size=G)
    step1 = _batch([[0, 0, 1, 0], [0, 0, 0, 0]], t=3)
    assert buffer.update(step1, ["p1", "p2"]) == 1
    assert "p1" in buffer and "p2" not in buffer
    step2 = _batch([[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], t=5)
    out, info = buffer.rescue(step2, ["p1", "p2", "p3"], np.random.default_rng(0))
    assert info == {"rescued_groups": 1, "rescue_skipped_too_long": 0}
    group0 = out["rewards"][:G]
    assert group0.sum() == 1.0  # exactly one sample replaced, by the correct one
    row = int(np.flatnonzero(group0)[0])
    # The stored row (step1 row 2) is right-padded from 3 to 5 tokens with masked zeros.
    np.testing.assert_array_equal(out["tokens"][row], [200, 201, 202, 0, 0])
    np.testing.assert_array_equal(out["mask"][row], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["rewards"][G:], step2["rewards"][G:])  # others untouched
    assert step2["rewards"].sum() == 1.0  # input not modified


def test_rollout_rescue_skips_rows_too_long_and_evicts_oldest():
    buffer = rl.RolloutRescueBuffer(group_size=G, max_prompts=1)
    buffer.update(_batch([[1, 0, 0, 0]], t=6), ["p1"])
    _, info = buffer.rescue(_batch([[0, 0, 0, 0]], t=4), ["p1"], np.random.default_rng(0))
    assert info == {"rescued_groups": 0, "rescue_skipped_too_long": 1}
    buffer.update(_batch([[0, 1, 0, 0]], t=6), ["p2"])
    assert len(buffer) == 1 and "p2" in buffer
    with pytest.raises(ValueError, match="prompt ids x group_size"):
        buffer.update(_batch([[0, 1, 0, 0]]), ["a", "b"])
