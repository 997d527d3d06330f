"""GRPO memory options: the optimiser state in host memory while the engine decodes, and bf16 params with a
float32 master copy, each on the real loop."""

import jax
import numpy as np
import pytest

from polaris_jax.train.grpo import loop as grpo_loop
from polaris_jax.train.grpo.config import ConfigError, validate_config
from tests.train.grpo.test_grpo_loop import polaris_tiny


def _short(**overrides):
    quiet = {"export.hf": False, "plots": False, "eval.dataset": "", "checkpoint.every": 100}
    config = polaris_tiny(**quiet, **overrides)
    with config.unlocked():
        config.schedule.max_response_len, config.schedule.temperature = (24,), (1.4,)
        config.schedule.steps, config.schedule.datasets = (2,), (config.schedule.datasets[0],)
        config.shaping.polaris_substitution = False  # every step updates
    return config


def _memory_kinds(tree) -> set:
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


@pytest.mark.slow  # values unchanged by the offload: two full loops; the planner test counts it in the default tier
def test_optimizer_state_waits_on_the_host_during_rollouts_and_nothing_changes(tmp_path, monkeypatch):
    original, seen = grpo_loop.collect, []

    def recording(run, *args, **kwargs):
        seen.append(_memory_kinds(run.state["opt_state"]))
        return original(run, *args, **kwargs)

    monkeypatch.setattr(grpo_loop, "collect", recording)
    results = {}
    for offload in (False, True):
        seen.clear()
        results[offload] = grpo_loop.run(
            _short(**{"optimizer.offload_during_rollout": offload}), str(tmp_path / str(offload))
        )
        assert seen == [{"pinned_host" if offload else "device"}] * 2
    for key in ("loss", "grad_norm", "param_norm", "reward_mean"):
        assert results[True][key] == results[False][key], key


@pytest.mark.slow  # the optimiser and SFT-step tests check the master in the default tier
def test_bf16_params_with_a_float32_master_train_in_the_loop(tmp_path, monkeypatch):
    """The loop runs with bf16 params and a master copy: the engine samples from the bf16 params, the
    optimiser state holds the float32 master, and after two updates the params are the master rounded."""
    final = {}
    original = grpo_loop._finish

    def keep_state(run, *args):
        final["state"] = jax.device_get(run.state)
        return original(run, *args)

    monkeypatch.setattr(grpo_loop, "_finish", keep_state)
    config = _short(**{"model.param_dtype": "bfloat16", "optimizer.master_weights": True})
    result = grpo_loop.run(config, str(tmp_path))
    assert np.isfinite(result["loss"])
    params, master = final["state"]["params"], final["state"]["opt_state"].master
    assert {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}
    assert {x.dtype.name for x in jax.tree.leaves(master)} == {"float32"}
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(master), strict=True):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(p.dtype)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optimizer.offload_during_rollout": True, "rollout.max_staleness": 1}, "needs the synchronous loop"),
        ({"optimizer.master_weights": True}, "model.param_dtype='float32'"),
    ],
)
def test_memory_options_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_short(**overrides))
