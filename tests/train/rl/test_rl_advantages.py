"""Advantage estimators vs numpy loops written from their papers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.train import rl

REWARDS_GN = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.5, -1.0, 2.0, 0.25]])


def _loop_stats(r):
    mean = sum(r) / len(r)
    std = (sum((x - mean) ** 2 for x in r) / (len(r) - 1)) ** 0.5
    return mean, std


def test_grpo():
    want = []
    for r in REWARDS_GN:
        mean, std = _loop_stats(r)
        want.append([(x - mean) / (std + 1e-6) for x in r])
    np.testing.assert_allclose(np.asarray(rl.grpo(REWARDS_GN)), want, rtol=1e-5, atol=1e-6)
    # An all-equal group gives zero advantage, not NaN.
    assert np.all(np.asarray(rl.grpo(REWARDS_GN))[1] == 0)


def test_dr_grpo():
    want = [[x - sum(r) / len(r) for x in r] for r in REWARDS_GN]
    np.testing.assert_allclose(np.asarray(rl.dr_grpo(REWARDS_GN)), want, atol=1e-6)


def test_rloo():
    """Ahmadian et al. 2024 (arXiv:2402.14740) eq. 6: baseline = mean of the other samples."""
    want = [
        [r[i] - sum(r[j] for j in range(len(r)) if j != i) / (len(r) - 1) for i in range(len(r))] for r in REWARDS_GN
    ]
    np.testing.assert_allclose(np.asarray(rl.rloo(REWARDS_GN)), want, atol=1e-6)


def test_reinforce_pp_baseline():
    """Hu et al. 2025 (REINFORCE++, arXiv:2501.03262): group-mean baseline, then global
    whitening over the batch."""
    centred = [x - sum(r) / len(r) for r in REWARDS_GN for x in r]
    mean, std = _loop_stats(centred)
    want = np.array([(x - mean) / (std + 1e-6) for x in centred]).reshape(REWARDS_GN.shape)
    np.testing.assert_allclose(np.asarray(rl.reinforce_pp_baseline(REWARDS_GN)), want, rtol=1e-5, atol=1e-6)


def test_compute_advantages_flat_and_jit():
    flat = jnp.asarray(REWARDS_GN.reshape(-1), jnp.float32)
    for name in rl.ADVANTAGES.names():
        eager = rl.compute_advantages(flat, 4, name)
        jitted = jax.jit(rl.compute_advantages, static_argnums=(1, 2))(flat, 4, name)
        want = np.asarray(rl.get_advantage(name)(REWARDS_GN)).reshape(-1)
        np.testing.assert_allclose(np.asarray(eager), want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(jitted), want, rtol=1e-6, atol=1e-7)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="does not split into groups of 3"):
        rl.compute_advantages(jnp.zeros(8), 3, "grpo")
    with pytest.raises(ValueError, match="at least 2 samples per group"):
        rl.grpo(jnp.zeros((4, 1)))
    with pytest.raises(KeyError, match="available: dr_grpo, grpo, reinforce_pp_baseline, rloo"):
        rl.compute_advantages(jnp.zeros(8), 4, "ppo")


def test_estimator_knobs_are_its_keyword_arguments():
    flat = jnp.asarray(REWARDS_GN.reshape(-1), jnp.float32)
    want = []
    for r in REWARDS_GN:
        mean, std = _loop_stats(r)
        want += [(x - mean) / (std + 0.5) for x in r]
    np.testing.assert_allclose(np.asarray(rl.compute_advantages(flat, 4, "grpo", epsilon=0.5)), want, rtol=1e-5)
    with pytest.raises(ValueError, match="advantage estimator 'rloo': got an unexpected keyword argument 'epsilon'"):
        rl.compute_advantages(flat, 4, "rloo", epsilon=1e-6)
