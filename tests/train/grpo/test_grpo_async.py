"""Bounded-staleness asynchronous GRPO (`rollout.max_staleness`): the batches a run collects ahead are the
synchronous run's batches (same prompts, seeds, shaping and host state), only sampled by older weights.

With a zero learning rate every weight version is the same, so an asynchronous run must reproduce the
synchronous run's per-step metrics exactly; its staleness metric must follow the schedule
(step t's batch sampled by the weights after update max(0, t - k)).
"""

from __future__ import annotations

import pytest

from polaris_jax.train.grpo import loop as grpo_loop
from tests.train.grpo.test_grpo_loop import _rows, polaris_tiny

COMPARED = ("reward_mean", "accuracy", "response_len_mean", "loss", "policy_loss", "entropy", "frac_all_correct_groups")


def _run(tmp_path, name: str, staleness: int) -> dict:
    config = polaris_tiny(
        **{
            "rollout.max_staleness": staleness,
            "rollout.backend": "static",  # collected ahead in step order (the engine streams in completion order)
            "optimizer.peak_lr": 0.0,
            "checkpoint.every": 100,
            "export.hf": False,
            "plots": False,
            "eval.dataset": "",
        }
    )
    with config.unlocked():  # one stage of 4 steps
        config.schedule.max_response_len, config.schedule.temperature = (32,), (1.4,)
        config.schedule.steps, config.schedule.datasets = (4,), (config.schedule.datasets[0],)
    grpo_loop.run(config, str(tmp_path / name))
    return _rows(str(tmp_path / name))


@pytest.mark.slow  # two GRPO runs, about 50 s on 2 cores: `make test-slow` (CI runs it)
def test_async_batches_equal_the_synchronous_ones_and_staleness_is_bounded(tmp_path):
    sync, ahead = _run(tmp_path, "sync", 0), _run(tmp_path, "k2", 2)
    assert sorted(sync) == sorted(ahead) == [1, 2, 3, 4]
    for step in sync:
        for key in COMPARED:
            if key in sync[step]:
                assert ahead[step][key] == pytest.approx(sync[step][key], rel=1e-6, abs=1e-7), (step, key)
    assert [sync[s]["rollout/staleness"] for s in sorted(sync)] == [0, 0, 0, 0]
    assert [ahead[s]["rollout/staleness"] for s in sorted(ahead)] == [0, 1, 2, 2]
    assert all(0.0 <= ahead[s]["rollout/wait_fraction"] <= 1.0 for s in ahead)
