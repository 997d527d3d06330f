"""The jitted GRPO update: the objective against log-probs computed independently for every aggregation
mode, token alignment, microbatch exactness, no recompiles, non-finite guard, reference KL, a new policy
loss run from a config, config kwargs refused before compiling, and 8 fake CPU devices (against 1, and
peak memory with the activation-sharding context against without)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import init_params, logits
from polaris_jax.train import rl
from polaris_jax.train import state as state_lib
from polaris_jax.train.grpo import step as grpo_step
from polaris_jax.train.grpo.config import ConfigError, stages, validate_config
from tests.train.grpo import grpo_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
P, R = grpo_helpers.PROMPT, grpo_helpers.RESPONSE


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _reference_logprobs_br(config, params, rollout, temperature):
    """log pi(response token j) from one full forward over the concatenated prompt and response, as
    transformers computes it: token j of the response is predicted at position P - 1 + j."""
    tokens_bt = np.concatenate([rollout.prompt_bt, rollout.response_br], axis=1)
    attention_bt = np.concatenate(
        [np.arange(P)[None] >= P - rollout.prompt_len_b[:, None], np.arange(R)[None] < rollout.response_len_b[:, None]],
        axis=1,
    )
    logp_btv = jax.nn.log_softmax(logits(config, params, tokens_bt, attention_bt) / temperature, axis=-1)
    predicts_response_brv = logp_btv[:, P - 1 : P - 1 + R]
    return jnp.take_along_axis(predicts_response_brv, jnp.asarray(rollout.response_br)[..., None], axis=-1)[..., 0]


def _token_mean(s_br, m_br, max_len):
    """DAPO (Yu et al. 2025, arXiv:2503.14476) eq. 8: every trained token of the batch weighs the same."""
    return jnp.sum(s_br * m_br) / jnp.sum(m_br)


def _seq_mean_token_mean(s_br, m_br, max_len):
    """GRPO (Shao et al. 2024, arXiv:2402.03300) eq. 3: 1/G sum_i 1/|o_i| sum_t; a response with no
    trained token (overlong-filtered) is not one of the G."""
    per_response = [jnp.sum(s_br[i] * m_br[i]) / m_br[i].sum() for i in range(len(m_br)) if m_br[i].sum() > 0]
    return sum(per_response) / len(per_response)


def _seq_mean_token_sum_norm(s_br, m_br, max_len):
    """Dr.GRPO (Liu et al. 2025, arXiv:2503.20783) sec. 3.1: 1/G sum_i 1/L_max sum_t, L_max the generation
    budget, G every response."""
    return sum(jnp.sum(s_br[i] * m_br[i]) for i in range(len(m_br))) / (len(m_br) * max_len)


PUBLISHED = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def test_every_registered_aggregation_has_a_published_reference():
    assert sorted(PUBLISHED) == rl.LOSS_AGGREGATIONS.names()


@pytest.mark.parametrize("mode", sorted(PUBLISHED))
def test_update_matches_the_published_objective_on_independent_logprobs(mode):
    """Loss and gradient of one SGD update against PPO-clip (Schulman et al. 2017) written out here, on
    log-probs of a plain forward pass, with fixed advantages and a ragged mask with holes. A wrong sign,
    a mask or advantage out of line with its tokens, or a wrong normaliser fails this in seconds."""
    temperature, rows = 0.8, 8
    rollout = grpo_helpers.random_rollout(11, rows)
    rng = np.random.default_rng(12)
    advantages_b = rng.normal(size=rows).astype(np.float32)
    mask_br = (rng.uniform(size=(rows, R)) < 0.8).astype(np.float32)
    mask_br[2] = 0.0  # an overlong-filtered response
    trained_br = mask_br * (np.arange(R)[None] < rollout.response_len_b[:, None])
    settings = grpo_helpers.settings(temperature=temperature, loss_agg_mode=mode)
    update, state, shardings, config = grpo_helpers.make_update(settings, lr=1.0, sgd=True)
    before = jax.device_get(state["params"])
    batch = grpo_step.put_update_batch(grpo_step.update_batch(rollout, advantages_b, mask_br), shardings)
    state, metrics = update(state, batch, jax.random.PRNGKey(0), None)
    metrics = jax.device_get(metrics)
    step_grads = jax.tree.map(lambda a, b: (a - b) / metrics["learning_rate"], before, jax.device_get(state["params"]))

    clip = dict(settings.policy_loss_kwargs)  # the config's clip range

    def published_loss(params):
        logp_br = _reference_logprobs_br(config, params, rollout, temperature)
        ratio_br = jnp.exp(logp_br - jax.lax.stop_gradient(logp_br))  # first update: pi_old = pi_theta
        a_b1 = advantages_b[:, None]
        clipped_br = jnp.clip(ratio_br, 1 - clip["clip_low"], 1 + clip["clip_high"])
        surrogate_br = jnp.minimum(ratio_br * a_b1, clipped_br * a_b1)
        return -PUBLISHED[mode](surrogate_br, jnp.asarray(trained_br), R)

    want_loss, want_grads = jax.value_and_grad(published_loss)(before)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5, atol=1e-7)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(step_grads)):
        scale = np.abs(want).max()
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(got, want, atol=2e-4 * scale, err_msg=jax.tree_util.keystr(path))


def test_response_logprobs_align_with_model_logits():
    """Response token j is scored from position P-1+j; compare with the model's HF-semantics logits."""
    config = grpo_helpers.tiny_config()
    params = init_params(config, jax.random.PRNGKey(0))
    batch = grpo_helpers.host_update_batch(3)
    settings = grpo_helpers.settings(temperature=0.7)
    stats = jax.jit(lambda p, b: grpo_step.response_stats(config, p, b, settings))(params, batch)
    full = np.asarray(logits(config, params, batch.tokens_bt, batch.segment_ids_bt), np.float64) / 0.7
    top = full.max(-1, keepdims=True)
    logp = full - np.log(np.exp(full - top).sum(-1, keepdims=True)) - top
    want = np.take_along_axis(logp[:, P - 1 : P - 1 + R], batch.response_br[..., None], -1)[..., 0]
    mask = batch.mask_br > 0
    np.testing.assert_allclose(np.asarray(stats["logprobs"])[mask], want[mask], atol=2e-5)
    probs = np.exp(logp[:, P - 1 : P - 1 + R])
    entropy = -(probs * logp[:, P - 1 : P - 1 + R]).sum(-1)
    np.testing.assert_allclose(np.asarray(stats["entropy"])[mask], entropy[mask], atol=2e-5)


# token-mean in make test; the other modes (~25 s together on 2 cores: the make test budget) in the slow tier
@pytest.mark.parametrize(
    "mode", [m if m == "token-mean" else pytest.param(m, marks=pytest.mark.slow) for m in sorted(PUBLISHED)]
)
def test_microbatches_give_the_full_minibatch_update(mode):
    batch = grpo_helpers.host_update_batch(5)
    batch.mask_br[:, 10:] = 0.0  # uneven token counts across rows
    batch.mask_br[1] = 0.0  # a row with no valid token
    results = []
    for micro in (1, 2):
        update, state, shardings, _ = grpo_helpers.make_update(
            grpo_helpers.settings(loss_agg_mode=mode, microbatches=micro), lr=1.0, sgd=True
        )
        state, metrics = update(state, grpo_step.put_update_batch(batch, shardings), jax.random.PRNGKey(0), None)
        results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    for params, metrics in results[1:]:
        np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(metrics["grad_norm"], results[0][1]["grad_norm"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, results[0][0])


def test_update_compiles_once_and_later_iterations_see_the_ratio():
    update, state, shardings, _ = grpo_helpers.make_update(grpo_helpers.settings(num_iterations=2, minibatches=2))
    for seed in range(3):
        batch = grpo_step.put_update_batch(grpo_helpers.host_update_batch(seed), shardings)
        state, metrics = update(state, batch, jax.random.PRNGKey(seed), None)
    assert update._cache_size() == 1
    metrics = jax.device_get(metrics)
    assert metrics["approx_kl"] > 0  # the second pass is off-policy against the recomputed old log-probs
    assert metrics["nonfinite_updates"] == 0 and metrics["first_nonfinite_update"] == -1


def test_nonfinite_loss_leaves_the_state_untouched():
    update, state, shardings, _ = grpo_helpers.make_update(grpo_helpers.settings(minibatches=2))
    before = jax.device_get(_copy(state["params"]))
    batch = grpo_helpers.host_update_batch(7)
    batch.advantages_b[0] = np.nan  # row 0 belongs to minibatch 0
    state, metrics = update(state, grpo_step.put_update_batch(batch, shardings), jax.random.PRNGKey(0), None)
    metrics = jax.device_get(metrics)
    assert metrics["nonfinite_updates"] == 1 and metrics["first_nonfinite_update"] == 0
    after = jax.device_get(state["params"])
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert any(changed)  # minibatch 1 was finite and applied
    assert int(jax.device_get(state["step"])) == 1


def test_reference_kl_starts_at_zero_and_grows():
    settings = grpo_helpers.settings(use_reference=True, kl_coef=0.1, kl_type="k3")
    update, state, shardings, _ = grpo_helpers.make_update(settings)
    ref = _copy(state_lib.full_params(state))
    kls = []
    for seed in range(3):
        batch = grpo_step.put_update_batch(grpo_helpers.host_update_batch(seed), shardings)
        state, metrics = update(state, batch, jax.random.PRNGKey(seed), ref)
        kls.append(float(jax.device_get(metrics["kl_to_ref"])))
    assert abs(kls[0]) < 1e-7 and kls[2] > 1e-6


# A new policy loss with a new hyperparameter: this registration is the only code it needs.
@rl.register_policy_loss("my_test_loss")
def my_test_loss(logprobs_bt, old_logprobs_bt, advantages, mask_bt, *, my_knob):
    """REINFORCE scaled by a knob: loss = -my_knob * A * log pi."""
    del old_logprobs_bt
    return jnp.where(mask_bt > 0, -my_knob * advantages[:, None] * logprobs_bt, 0.0), {}


def test_a_new_policy_loss_with_its_own_knob_runs_from_the_config():
    results = {}
    for knob in (0.5, 1.0):
        config = grpo_helpers.grpo_config(policy_loss="my_test_loss")
        config.algo.policy_loss_kwargs.my_knob = knob
        validate_config(config)
        settings = grpo_step.update_settings(config, stages(config)[0])
        assert settings.policy_loss_kwargs == (("my_knob", knob),)  # the clip range is not its knob
        update, state, shardings, _ = grpo_helpers.make_update(settings, lr=1.0, sgd=True)
        batch = grpo_step.put_update_batch(grpo_helpers.host_update_batch(4), shardings)
        _, metrics = update(state, batch, jax.random.PRNGKey(0), None)
        results[knob] = jax.device_get(metrics)
    np.testing.assert_allclose(results[0.5]["loss"], 0.5 * results[1.0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(results[0.5]["grad_norm"], 0.5 * results[1.0]["grad_norm"], rtol=1e-5)
    assert results[1.0]["loss"] != 0


_BAD_KWARGS = {
    "unknown_loss_kwarg": (
        dict(policy_loss_kwargs=dict(clip_ratio=3.0)),
        r"algo.policy_loss_kwargs: policy loss 'ppo_clip'.*unexpected keyword argument "
        r"'clip_ratio'",
    ),
    "missing_loss_kwarg": (
        dict(policy_loss="my_test_loss"),
        r"policy loss 'my_test_loss'.*missing a required argument: 'my_knob'",
    ),
    "clip_for_a_loss_that_has_none": (
        dict(policy_loss="my_test_loss", policy_loss_kwargs=dict(my_knob=1.0, clip_ratio_c=3.0)),
        r"'my_test_loss'.*unexpected keyword argument 'clip_ratio_c'",
    ),
    "clip_range_in_kwargs": (dict(policy_loss_kwargs=dict(clip_high=0.3)), r"set algo.clip_high instead"),
    "unhashable": (
        dict(policy_loss_kwargs=dict(clip_ratio_c=dict(a=1))),
        r"clip_ratio_c is a ConfigDict; it must be a number",
    ),
    "unknown_advantage_kwarg": (
        dict(advantage="dr_grpo", advantage_kwargs=dict(epsilon=1e-6)),
        r"advantage estimator 'dr_grpo'.*unexpected keyword argument 'epsilon'",
    ),
}


@pytest.mark.parametrize("name", sorted(_BAD_KWARGS))
def test_config_kwargs_are_bound_to_the_signature_before_compiling(name):
    algo, message = _BAD_KWARGS[name]
    with pytest.raises(ConfigError, match=message):
        validate_config(grpo_helpers.grpo_config(**algo))


def test_config_refuses_what_the_registries_declare_and_bad_think_policy(monkeypatch):
    validate_config(grpo_helpers.grpo_config(advantage="grpo", advantage_kwargs=dict(epsilon=1e-4)))
    config = grpo_helpers.grpo_config(advantage="rloo")
    config.rollout.samples_per_prompt = 1
    with pytest.raises(ConfigError, match="'rloo' needs rollout.samples_per_prompt >= 2, got 1"):
        validate_config(config)
    config.algo.advantage = "dr_grpo"
    validate_config(config)  # defined for one sample per prompt
    config = grpo_helpers.grpo_config()
    config.verifier.think_policy = "sometimes"
    with pytest.raises(ConfigError, match="verifier.think_policy='sometimes'"):
        validate_config(config)
    monkeypatch.setattr(rl, "micro_weight", lambda mode: None)  # an aggregation that declares no weighting
    with pytest.raises(ConfigError, match="declares no microbatch weighting"):
        validate_config(grpo_helpers.grpo_config(microbatches=2, minibatches=1))


def _worker(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "tests.train.grpo.grpo_sharding_worker", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


@pytest.mark.slow  # ~21 s on 2 cores (make test budget); CI runs it
def test_eight_fake_devices_match_one():
    out = _worker()
    assert "MATCH" in out, out[-2000:]


@pytest.mark.slow  # about 35 s on 2 cores: `make test-slow` (CI runs it)
def test_activation_sharding_does_not_raise_peak_memory():
    """The update traced in the activation-sharding context (as SFT) against the same function jitted bare,
    both compiled here on a data x fsdp x tensor = 2 x 2 x 2 mesh."""
    line = next(line for line in _worker("memory").splitlines() if line.startswith("MEMORY "))
    for microbatches, peak in json.loads(line[len("MEMORY ") :]).items():
        assert peak["with"] <= peak["without"], (microbatches, peak)
