"""The jitted GRPO update: token alignment, microbatch exactness, no recompiles, non-finite guard,
reference KL, and 8 fake CPU devices against 1."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import init_params, logits
from polaris_jax.train.grpo import step as grpo_step
from polaris_jax.train import state as state_lib
from tests.train.grpo import grpo_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _settings(**kw):
    return grpo_step.UpdateSettings(max_response_len=grpo_helpers.RESPONSE, chunk_size=8, **kw)


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_response_logprobs_align_with_model_logits():
    """Response token j is scored from position P-1+j; compare with the model's HF-semantics logits."""
    config = grpo_helpers.tiny_config()
    params = init_params(config, jax.random.PRNGKey(0))
    batch = grpo_helpers.host_update_batch(3)
    stats = jax.jit(lambda p, b: grpo_step.response_stats(config, p, b, _settings(temperature=0.7)))(params, batch)
    full = np.asarray(logits(config, params, batch["tokens_bt"], batch["segment_ids_bt"]), np.float64) / 0.7
    logp = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
    p, r = grpo_helpers.PROMPT, grpo_helpers.RESPONSE
    want = np.take_along_axis(logp[:, p - 1:p - 1 + r], batch["response_br"][..., None], -1)[..., 0]
    mask = batch["mask_br"] > 0
    np.testing.assert_allclose(np.asarray(stats["logprobs"])[mask], want[mask], atol=2e-5)
    probs = np.exp(logp[:, p - 1:p - 1 + r])
    entropy = -(probs * logp[:, p - 1:p - 1 + r]).sum(-1)
    np.testing.assert_allclose(np.asarray(stats["entropy"])[mask], entropy[mask], atol=2e-5)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_microbatches_give_the_full_minibatch_update(mode):
    batch = grpo_helpers.host_update_batch(5)
    batch["mask_br"][:, 10:] = 0.0  # uneven token counts across rows
    batch["mask_br"][1] = 0.0  # a row with no valid token
    results = []
    for micro in (1, 2):
        update, state, shardings, _ = grpo_helpers.make_update(_settings(loss_agg_mode=mode, microbatches=micro),
                                                               lr=1.0, sgd=True)
        state, metrics = update(state, grpo_step.put_update_batch(batch, shardings), jax.random.PRNGKey(0), None)
        results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    for params, metrics in results[1:]:
        np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(metrics["grad_norm"], results[0][1]["grad_norm"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, results[0][0])


def test_update_compiles_once_and_later_iterations_see_the_ratio():
    update, state, shardings, _ = grpo_helpers.make_update(_settings(num_iterations=2, minibatches=2))
    for seed in range(3):
        batch = grpo_step.put_update_batch(grpo_helpers.host_update_batch(seed), shardings)
        state, metrics = update(state, batch, jax.random.PRNGKey(seed), None)
    assert update._cache_size() == 1
    metrics = jax.device_get(metrics)
    assert metrics["approx_kl"] > 0  # the second pass is off-policy against the recomputed old log-probs
    assert metrics["nonfinite_updates"] == 0 and metrics["first_nonfinite_update"] == -1


def test_nonfinite_loss_leaves_the_state_untouched():
    update, state, shardings, _ = grpo_helpers.make_update(_settings(minibatches=2))
    before = jax.device_get(_copy(state["params"]))
    batch = grpo_helpers.host_update_batch(7)
    batch["advantages_b"][0] = np.nan  # row 0 belongs to minibatch 0
    state, metrics = update(state, grpo_step.put_update_batch(batch, shardings), jax.random.PRNGKey(0), None)
    metrics = jax.device_get(metrics)
    assert metrics["nonfinite_updates"] == 1 and metrics["first_nonfinite_update"] == 0
    after = jax.device_get(state["params"])
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert any(changed)  # minibatch 1 was finite and applied
    assert int(jax.device_get(state["step"])) == 1


def test_reference_kl_starts_at_zero_and_grows():
    settings = _settings(use_reference=True, kl_coef=0.1, kl_type="k3")
    update, state, shardings, _ = grpo_helpers.make_update(settings)
    ref = _copy(state_lib.full_params(state))
    kls = []
    for seed in range(3):
        batch = grpo_step.put_update_batch(grpo_helpers.host_update_batch(seed), shardings)
        state, metrics = update(state, batch, jax.random.PRNGKey(seed), ref)
        kls.append(float(jax.device_get(metrics["kl_to_ref"])))
    assert abs(kls[0]) < 1e-7 and kls[2] > 1e-6


def test_eight_fake_devices_match_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "tests.train.grpo.grpo_sharding_worker"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "MATCH" in out.stdout, out.stdout[-2000:]
