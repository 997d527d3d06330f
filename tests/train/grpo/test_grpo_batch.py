"""`build_step_batch` on hand-made rollouts: advantages, loss mask and problem ids stay with their rows through
dynamic sampling, Polaris substitution and overlong filtering."""

import numpy as np
import pytest

from polaris_jax.data.problems import Problem
from polaris_jax.rollout import Rollouts
from polaris_jax.sampling import FINISH_EOS, FINISH_LENGTH
from polaris_jax.train.grpo import batch as grpo_batch
from polaris_jax.train.grpo.config import default_config
from polaris_jax.train.grpo.host_state import HostState

N = 4  # samples per prompt
R = 12  # response width
EPSILON = 1e-6  # grpo's default


def grpo_advantages(rewards_b):
    """GRPO written out: (r - mean_g) / (std_g + eps) per group, std with Bessel's correction."""
    out = []
    for group in np.asarray(rewards_b, np.float64).reshape(-1, N):
        out += [(r - group.mean()) / (group.std(ddof=1) + EPSILON) for r in group]
    return np.asarray(out)


def make_rollouts(rewards_gn, *, tag: int, truncated=()) -> Rollouts:
    """Group-major rows; row b's response is `tag * 100 + b + 1` repeated over its own length 2 + (3b mod 10),
    so every row (and round) is recognisable and every row has a different length. `truncated` rows end by
    length."""
    rewards_b = np.asarray(rewards_gn, np.float32).reshape(-1)
    rows = len(rewards_b)
    response_len_b = np.asarray([2 + (3 * b) % 10 for b in range(rows)], np.int32)
    response_br = np.zeros((rows, R), np.int32)
    for b in range(rows):
        response_br[b, : response_len_b[b]] = tag * 100 + b + 1
    finish_b = np.full(rows, FINISH_EOS, np.int32)
    finish_b[list(truncated)] = FINISH_LENGTH
    return Rollouts(
        prompt_bt=np.repeat(np.arange(rows // N, dtype=np.int32) + tag * 100, N)[:, None].repeat(3, axis=1),
        prompt_len_b=np.full(rows, 3, np.int32),
        response_br=response_br,
        response_len_b=response_len_b,
        sampler_logprobs_br=-np.arange(rows * R, dtype=np.float32).reshape(rows, R) / 100,
        finish_b=finish_b,
        correct_b=(rewards_b >= 0.5).astype(np.float32),
        rewards_b=rewards_b,
        group_b=np.repeat(np.arange(rows // N, dtype=np.int32), N),
    )


def scripted_sample(rounds, calls):
    """`sample(position, round)` returning the prepared rollouts of that round, with problems named by
    stream position."""

    def sample(position, round_index):
        calls.append((position, round_index))
        rollouts = rounds[round_index]
        problems = [Problem(f"p{position + g}", (1, 2, 3), "0") for g in range(rollouts.rows // N)]
        return rollouts, problems, {"time_rollout": 1.0 + round_index, "time_reward": 0.5, "reward_failures": 0.0}

    return sample


def config_with(prompts: int, **shaping):
    c = default_config()
    c.rollout.prompts_per_step = prompts
    c.rollout.samples_per_prompt = N
    c.shaping.update(shaping)
    return c


def build(rounds, prompts, **shaping):
    calls, host = [], HostState()
    out = grpo_batch.build_step_batch(
        sample=scripted_sample(rounds, calls), config=config_with(prompts, **shaping), step=3, host=host, group_size=N
    )
    return out, calls, host


def expected_mask(rollouts, *, overlong_filter: bool):
    mask_br = np.zeros((rollouts.rows, R), np.float32)
    for b in range(rollouts.rows):
        if not (overlong_filter and rollouts.finish_b[b] == FINISH_LENGTH):
            mask_br[b, : rollouts.response_len_b[b]] = 1.0
    return mask_br


def assert_rows_line_up(out, *, overlong_filter: bool):
    """The advantages are GRPO of the batch's own rewards, and the mask covers each row's own response."""
    np.testing.assert_allclose(out.advantages_b, grpo_advantages(out.rollouts.rewards_b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.mask_br, expected_mask(out.rollouts, overlong_filter=overlong_filter))
    # Each row's response is still its own: the tag of source row b fills exactly its 2 + (3b mod 10) tokens.
    for b in range(out.rollouts.rows):
        length, tokens = out.rollouts.response_len_b[b], out.rollouts.response_br[b]
        source_row = (int(tokens[0]) - 1) % 100
        assert length == 2 + (3 * source_row) % 10
        assert (tokens[:length] == tokens[0]).all() and not tokens[length:].any()


@pytest.mark.parametrize("overlong_filter", [False, True])
def test_without_resampling_advantages_and_mask_follow_their_rows(overlong_filter):
    rewards = [[1.0, 0.2, 0.0, 0.7], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.9, 0.3]]
    raw = make_rollouts(rewards, tag=0, truncated=(1, 6, 10))
    out, calls, host = build({0: raw}, 3, overlong_filter=overlong_filter)

    assert calls == [(0, 0)] and host.position == 3 and not out.skip
    assert out.rollouts is raw
    assert out.problem_ids == ["p0", "p1", "p2"]
    assert_rows_line_up(out, overlong_filter=overlong_filter)
    np.testing.assert_allclose(out.advantages_b[4:8], 0.0)  # the all-equal group
    if overlong_filter:
        assert not out.mask_br[[1, 6, 10]].any()
        assert out.mask_br[0].sum() == raw.response_len_b[0]
    else:
        np.testing.assert_array_equal(out.mask_br.sum(axis=1), raw.response_len_b)
    assert out.info["accuracy"] == pytest.approx(raw.correct_b.mean())
    assert out.info["frac_informative_groups"] == pytest.approx(2 / 3)


def test_dynamic_sampling_appends_the_next_rounds_groups_with_their_own_problems():
    first = make_rollouts([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0.5, 1]], tag=1, truncated=(9,))
    second = make_rollouts([[0, 0, 0, 0], [0.25, 0, 0, 1], [1, 0, 0, 0]], tag=2, truncated=(4,))
    out, calls, host = build({0: first, 1: second}, 3, dynamic_sampling=True, overlong_filter=True)

    assert calls == [(0, 0), (3, 1)] and host.position == 6
    # Round 0 keeps its groups 0 and 2; round 1 adds its group 1, pool index 3 + 1; its group 2 is surplus.
    np.testing.assert_array_equal(out.rollouts.group_b, np.repeat([0, 2, 4], N))
    assert out.problem_ids == ["p0", "p2", "p4"]
    rows = np.r_[0:4, 8:12]
    np.testing.assert_array_equal(out.rollouts.response_br[:8], first.response_br[rows])
    np.testing.assert_array_equal(out.rollouts.response_br[8:], second.response_br[4:8])
    np.testing.assert_array_equal(
        out.rollouts.rewards_b, np.concatenate([first.rewards_b[rows], second.rewards_b[4:8]])
    )
    np.testing.assert_array_equal(
        out.rollouts.response_len_b, np.concatenate([first.response_len_b[rows], second.response_len_b[4:8]])
    )
    assert_rows_line_up(out, overlong_filter=True)
    assert not out.mask_br[[5, 8]].any()  # first's row 9 and second's row 4, where they landed
    assert out.info["time_rollout"] == pytest.approx(1.0 + 2.0)
    assert out.info["time_reward"] == pytest.approx(1.0)
    assert out.info["dynamic_sampling_rounds"] == 2.0
    assert out.info["frac_informative_groups"] == 1.0
    # Policy metrics are measured on the first round as sampled.
    assert out.info["accuracy"] == pytest.approx(first.correct_b.mean())


def test_polaris_substitution_overwrites_uninformative_groups_with_whole_informative_ones():
    rewards = [[1, 1, 1, 1], [0, 1, 0.5, 0], [0, 0, 0, 0], [1, 0, 0, 0.25]]
    raw = make_rollouts(rewards, tag=3, truncated=(5, 14))
    out, _, _ = build({0: raw}, 4, polaris_substitution=True, overlong_filter=True)

    assert not out.skip and out.info["num_substituted_groups"] == 2.0
    shaped = out.rollouts
    sources = []
    for g in range(4):
        # Every output group is a whole input group: all its rows and fields come from one source group.
        source = int(shaped.group_b[g * N])
        rows, src = slice(g * N, (g + 1) * N), slice(source * N, (source + 1) * N)
        for field in ("response_br", "response_len_b", "finish_b", "rewards_b", "sampler_logprobs_br", "group_b"):
            np.testing.assert_array_equal(getattr(shaped, field)[rows], getattr(raw, field)[src], err_msg=field)
        assert out.problem_ids[g] == f"p{source}"
        sources.append(source)
    assert sources[1] == 1 and sources[3] == 3  # informative groups stay in place
    assert sorted(sources[0::2]) == [1, 3]  # the all-1 and all-0 groups: one copy of each informative group
    assert_rows_line_up(out, overlong_filter=True)
    # A copied group carries its donor's advantages and mask.
    np.testing.assert_allclose(out.advantages_b[0:4], out.advantages_b[sources[0] * N : sources[0] * N + 4])
    np.testing.assert_array_equal(out.mask_br[0:4], out.mask_br[sources[0] * N : sources[0] * N + 4])
    assert out.info["frac_informative_groups"] == 1.0


def test_polaris_substitution_skips_a_step_with_too_few_informative_groups():
    raw = make_rollouts([[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], tag=4)
    out, _, _ = build({0: raw}, 4, polaris_substitution=True)

    assert out.skip and out.info["skipped_step"] == 1.0 and out.info["num_substituted_groups"] == 0.0
    assert out.rollouts is raw and out.problem_ids == ["p0", "p1", "p2", "p3"]
    assert_rows_line_up(out, overlong_filter=False)
