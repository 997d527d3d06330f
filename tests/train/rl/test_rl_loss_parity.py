"""Loss parity: our composed `rl_loss` vs plain numpy loops written from the papers."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_reference_batch import GROUP_SIZE, T, make_batch, numpy_grpo_advantages

from polaris_jax.train.rl import rl_loss


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _ours(batch, advantages_b, **kwargs):
    loss, metrics = rl_loss(
        _f32(batch["logprobs_bt"]),
        _f32(batch["old_logprobs_bt"]),
        _f32(advantages_b),
        _f32(batch["mask_bt"]),
        **kwargs,
    )
    return float(loss), metrics


def _tokens(batch, i):
    """Valid token indices of response i."""
    return range(int(batch["mask_bt"][i].sum()))


@pytest.fixture(scope="module")
def batch():
    return make_batch(seed=0)


def numpy_grpo_objective(batch, adv_b, eps, beta):
    """GRPO, DeepSeekMath (Shao et al. 2024, arXiv:2402.03300) eq. 3 and 4, as used by
    DeepSeek-R1 (arXiv:2501.12948) eq. 1-2:
    J = 1/G sum_i 1/|o_i| sum_t [min(r A, clip(r, 1-eps, 1+eps) A) - beta D_KL],
    D_KL = pi_ref/pi - log(pi_ref/pi) - 1. Returns the loss, -J."""
    lp, old, ref = batch["logprobs_bt"], batch["old_logprobs_bt"], batch["ref_logprobs_bt"]
    total, n = 0.0, lp.shape[0]
    for i in range(n):
        toks = list(_tokens(batch, i))
        acc = 0.0
        for t in toks:
            r = math.exp(lp[i, t] - old[i, t])
            surrogate = min(r * adv_b[i], min(max(r, 1 - eps), 1 + eps) * adv_b[i])
            ref_ratio = math.exp(ref[i, t] - lp[i, t])
            d_kl = ref_ratio - math.log(ref_ratio) - 1
            acc += surrogate - beta * d_kl
        total += acc / len(toks)
    return -total / n


def numpy_dapo_objective(batch, adv_b, eps_low, eps_high):
    """DAPO (Yu et al. 2025, arXiv:2503.14476) eq. 8: token-level mean over all tokens of the
    batch, clip range [1 - eps_low, 1 + eps_high] (clip-higher, sec. 3.1), no KL."""
    lp, old = batch["logprobs_bt"], batch["old_logprobs_bt"]
    total, num_tokens = 0.0, 0
    for i in range(lp.shape[0]):
        for t in _tokens(batch, i):
            r = math.exp(lp[i, t] - old[i, t])
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            total += min(r * adv_b[i], clipped * adv_b[i])
            num_tokens += 1
    return -total / num_tokens


def numpy_dr_grpo(batch, eps, max_len):
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783)
    eq. 3: A_i = R_i - mean(R) (no std) and no 1/|o_i|; their code divides the per-response
    token sum by the constant generation budget. Returns (advantages, loss)."""
    rewards = batch["rewards_b"]
    adv = np.empty_like(rewards)
    for g in range(len(rewards) // GROUP_SIZE):
        r = rewards[g * GROUP_SIZE : (g + 1) * GROUP_SIZE]
        adv[g * GROUP_SIZE : (g + 1) * GROUP_SIZE] = r - sum(r) / len(r)
    lp, old = batch["logprobs_bt"], batch["old_logprobs_bt"]
    total = 0.0
    for i in range(lp.shape[0]):
        for t in _tokens(batch, i):
            r = math.exp(lp[i, t] - old[i, t])
            total += min(r * adv[i], min(max(r, 1 - eps), 1 + eps) * adv[i]) / max_len
    return adv, -total / lp.shape[0]


def numpy_gspo_objective(lp, old, mask, adv_b, eps_low, eps_high):
    """GSPO (Zheng et al. 2025, arXiv:2507.18071) eq. 5-7:
    s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), J = 1/G sum_i min(s_i A_i, clip(s_i) A_i)."""
    total = 0.0
    for i in range(lp.shape[0]):
        n_i = int(mask[i].sum())
        s = math.exp(sum(lp[i, t] - old[i, t] for t in range(n_i)) / n_i)
        total += min(s * adv_b[i], min(max(s, 1 - eps_low), 1 + eps_high) * adv_b[i])
    return -total / lp.shape[0]


def test_grpo_matches_deepseekmath(batch):
    adv_b = numpy_grpo_advantages(batch["rewards_b"])
    want = numpy_grpo_objective(batch, adv_b, eps=0.2, beta=0.04)
    got, metrics = _ours(
        batch,
        adv_b,
        policy_loss="ppo_clip",
        policy_loss_kwargs=dict(clip_low=0.2, clip_high=0.2),
        loss_agg_mode="seq-mean-token-mean",
        ref_logprobs_bt=_f32(batch["ref_logprobs_bt"]),
        kl_coef=0.04,
        kl_type="k3",
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert 0.0 < float(metrics["clip_fraction"]) < 1.0  # the batch exercises clipping


def test_dapo_matches_clip_higher_token_mean(batch):
    adv_b = numpy_grpo_advantages(batch["rewards_b"])
    # The batch must hold a token that clip-higher treats differently from symmetric 0.2.
    ratio = np.exp(batch["logprobs_bt"] - batch["old_logprobs_bt"])
    pos = (adv_b[:, None] > 0) & (ratio > 1.2) & (ratio < 1.28) & (batch["mask_bt"] > 0)
    assert pos.any()
    want = numpy_dapo_objective(batch, adv_b, 0.2, 0.28)
    got, _ = _ours(batch, adv_b, policy_loss_kwargs=dict(clip_low=0.2, clip_high=0.28), loss_agg_mode="token-mean")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    symmetric, _ = _ours(batch, adv_b, policy_loss_kwargs=dict(clip_low=0.2, clip_high=0.2), loss_agg_mode="token-mean")
    assert abs(symmetric - got) > 1e-5


@pytest.mark.parametrize("max_len", [None, 32])
def test_dr_grpo_matches_paper(batch, max_len):
    adv_np, want = numpy_dr_grpo(batch, eps=0.2, max_len=max_len or T)
    from polaris_jax.train.rl import compute_advantages

    adv_jax = compute_advantages(_f32(batch["rewards_b"]), GROUP_SIZE, "dr_grpo")
    np.testing.assert_allclose(np.asarray(adv_jax), adv_np, rtol=1e-6, atol=1e-6)
    got, _ = _ours(
        batch,
        adv_jax,
        policy_loss_kwargs=dict(clip_low=0.2, clip_high=0.2),
        loss_agg_mode="seq-mean-token-sum-norm",
        max_response_len=max_len,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def gspo_batch():
    # Tiny per-sequence drifts so that some sequences sit inside GSPO's 3e-4 / 4e-4 band.
    b = make_batch(seed=1, logprob_noise=2e-4)
    drift_b = np.array([0.0, 1e-4, -2e-4, 5e-4, -6e-4, 2e-3, 1e-5, -1e-4, 3e-4, -3e-5, 8e-4, 1e-4])
    b["logprobs_bt"] = b["logprobs_bt"] + drift_b[:, None]
    return b


def test_gspo_matches_sequence_level_objective(gspo_batch):
    b = gspo_batch
    adv_b = numpy_grpo_advantages(b["rewards_b"])
    want = numpy_gspo_objective(b["logprobs_bt"], b["old_logprobs_bt"], b["mask_bt"], adv_b, 3e-4, 4e-4)
    got, metrics = _ours(
        b,
        adv_b,
        policy_loss="gspo",
        policy_loss_kwargs=dict(clip_low=3e-4, clip_high=4e-4),
        loss_agg_mode="seq-mean-token-mean",
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert 0.0 < float(metrics["clip_fraction"]) < 1.0


def _central_differences(f, x, h):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (f(up) - f(down)) / (2 * h)
    return grad


def test_gspo_gradient_matches_finite_differences(gspo_batch):
    b = gspo_batch
    adv_b = numpy_grpo_advantages(b["rewards_b"])

    def numpy_loss(lp):
        return numpy_gspo_objective(lp, b["old_logprobs_bt"], b["mask_bt"], adv_b, 3e-4, 4e-4)

    want = _central_differences(numpy_loss, b["logprobs_bt"], 1e-7)

    def jax_loss(lp):
        return rl_loss(
            lp,
            _f32(b["old_logprobs_bt"]),
            _f32(adv_b),
            _f32(b["mask_bt"]),
            policy_loss="gspo",
            policy_loss_kwargs=dict(clip_low=3e-4, clip_high=4e-4),
            loss_agg_mode="seq-mean-token-mean",
        )[0]

    got = np.asarray(jax.grad(jax_loss)(_f32(b["logprobs_bt"])))
    assert np.abs(want).max() > 1e-3  # some sequences are unclipped and carry gradient
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-5)


def test_dapo_gradient_matches_finite_differences(batch):
    adv_b = numpy_grpo_advantages(batch["rewards_b"])

    def numpy_loss(lp):
        return numpy_dapo_objective({**batch, "logprobs_bt": lp}, adv_b, 0.2, 0.28)

    want = _central_differences(numpy_loss, batch["logprobs_bt"], 1e-6)
    loss_fn = functools.partial(
        rl_loss, policy_loss_kwargs=dict(clip_low=0.2, clip_high=0.28), loss_agg_mode="token-mean"
    )
    got = jax.grad(lambda lp: loss_fn(lp, _f32(batch["old_logprobs_bt"]), _f32(adv_b), _f32(batch["mask_bt"]))[0])(
        _f32(batch["logprobs_bt"])
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
    # Padding tokens never get gradient.
    assert np.all(np.asarray(got)[batch["mask_bt"] == 0] == 0)
