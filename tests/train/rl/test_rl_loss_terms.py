"""The pieces of `rl_loss` beyond the four parity cases: dual-clip, CISPO, TIS, KL
estimators, entropy, metrics, jit, bad input and the registries' declarations."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_reference_batch import make_batch, numpy_grpo_advantages

from polaris_jax.train import rl


def _f32(x):
    return jnp.asarray(x, jnp.float32)


@pytest.fixture(scope="module")
def batch():
    b = make_batch(seed=3, logprob_noise=0.6)
    b["adv_b"] = numpy_grpo_advantages(b["rewards_b"])
    return b


PPO = dict(clip_low=0.2, clip_high=0.2)  # symmetric PPO-clip (Schulman et al. 2017)


def _args(b):
    keys = ("logprobs_bt", "old_logprobs_bt", "adv_b", "mask_bt")
    return tuple(_f32(b[k]) for k in keys)


def _valid(b):
    return [(i, t) for i in range(b["mask_bt"].shape[0]) for t in range(int(b["mask_bt"][i].sum()))]


def test_dual_clip_matches_ye_et_al(batch):
    """Dual-clip PPO (Ye et al. 2020, arXiv:1912.09729, eq. 6): for A < 0 the objective is
    max(min(r A, clip(r) A), c A)."""
    c, eps = 2.0, 0.2
    lp, old, adv = batch["logprobs_bt"], batch["old_logprobs_bt"], batch["adv_b"]
    total = 0.0
    for i, t in _valid(batch):
        r = math.exp(lp[i, t] - old[i, t])
        obj = min(r * adv[i], min(max(r, 1 - eps), 1 + eps) * adv[i])
        if adv[i] < 0:
            obj = max(obj, c * adv[i])
        total += obj
    want = -total / len(_valid(batch))
    ratio = np.exp(lp - old)
    assert ((adv[:, None] < 0) & (ratio > c) & (batch["mask_bt"] > 0)).any()  # case exercised
    got, _ = rl.rl_loss(*_args(batch), policy_loss_kwargs=dict(clip_low=eps, clip_high=eps, clip_ratio_c=c))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_cispo_gradient_is_clipped_weight_times_score(batch):
    """MiniMax-M1 (arXiv:2506.13585) eq. 4: grad = -1/N sum sg(clip(r)) A grad log pi."""
    lp, old = batch["logprobs_bt"], batch["old_logprobs_bt"]
    adv, mask = batch["adv_b"], batch["mask_bt"]
    r = np.exp(lp - old)
    w = np.clip(r, 1 - 1.0, 1 + 0.28)
    want = -(w * adv[:, None] * mask) / mask.sum()
    loss_fn = functools.partial(rl.rl_loss, policy_loss="cispo", policy_loss_kwargs=dict(clip_low=1.0, clip_high=0.28))
    got = jax.grad(lambda x: loss_fn(x, *_args(batch)[1:])[0])(_f32(lp))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    _, metrics = loss_fn(*_args(batch))
    np.testing.assert_allclose(float(metrics["clip_fraction"]), ((r > 1.28) * mask).sum() / mask.sum(), rtol=1e-6)


def test_tis_reweights_each_token(batch):
    """Yao et al. 2025 (fengyao.notion.site/off-policy-rl): w = min(pi_old / pi_sampler, C)."""
    cap = 2.0
    lp, old, samp = batch["logprobs_bt"], batch["old_logprobs_bt"], batch["sampler_logprobs_bt"]
    adv, valid = batch["adv_b"], _valid(batch)
    total = 0.0
    for i, t in valid:
        r = math.exp(lp[i, t] - old[i, t])
        pg = -min(r * adv[i], min(max(r, 0.8), 1.2) * adv[i])
        total += min(math.exp(old[i, t] - samp[i, t]), cap) * pg
    got, metrics = rl.rl_loss(
        *_args(batch), policy_loss_kwargs=PPO, sampler_logprobs_bt=_f32(samp), off_policy="tis", off_policy_cap=cap
    )
    np.testing.assert_allclose(float(got), total / len(valid), rtol=1e-5)
    assert 0.0 < float(metrics["off_policy_clipped_fraction"]) < 1.0
    ratios = [math.exp(old[i, t] - samp[i, t]) for i, t in valid]
    np.testing.assert_allclose(float(metrics["off_policy_ratio_max"]), max(ratios), rtol=1e-5)


@pytest.mark.parametrize("name", ["mis", "decoupled"])
def test_masked_and_decoupled_importance_weights(batch, name):
    """MIS: w = rho if rho <= C else 0 (tokens past the cap are dropped); AReaL's decoupled objective:
    w = rho = pi_old / pi_behaviour, uncapped, with the PPO clip taken against pi_old."""
    cap = 1.5
    lp, old, samp = batch["logprobs_bt"], batch["old_logprobs_bt"], batch["sampler_logprobs_bt"]
    adv, valid = batch["adv_b"], _valid(batch)
    total, dropped = 0.0, 0
    for i, t in valid:
        r = math.exp(lp[i, t] - old[i, t])
        pg = -min(r * adv[i], min(max(r, 0.8), 1.2) * adv[i])
        rho = math.exp(old[i, t] - samp[i, t])
        w = rho if name == "decoupled" or rho <= cap else 0.0
        dropped += name == "mis" and rho > cap
        total += w * pg
    got, metrics = rl.rl_loss(
        *_args(batch), policy_loss_kwargs=PPO, sampler_logprobs_bt=_f32(samp), off_policy=name, off_policy_cap=cap
    )
    np.testing.assert_allclose(float(got), total / len(valid), rtol=1e-5)
    if name == "mis":
        assert 0 < dropped < len(valid)
        np.testing.assert_allclose(float(metrics["off_policy_masked_fraction"]), dropped / len(valid), rtol=1e-5)


def test_kl_estimators_match_schulman(batch):
    lp, ref, mask = batch["logprobs_bt"], batch["ref_logprobs_bt"], batch["mask_bt"]
    log_r = ref - lp  # log(pi_ref / pi)
    want = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - log_r - 1}
    for name, value in want.items():
        got = rl.kl_penalty(_f32(lp), _f32(ref), _f32(mask), name)
        np.testing.assert_allclose(np.asarray(got), value * mask, rtol=1e-5, atol=1e-6)
    # low_var_kl is k3, clamped to [-10, 10] for extreme tokens (verl's low_var_kl).
    extreme = rl.kl_penalty(_f32([[0.0, -30.0]]), _f32([[-30.0, 0.0]]), _f32([[1, 1]]), "low_var_kl")
    assert np.asarray(extreme).max() <= 10.0 and np.isfinite(np.asarray(extreme)).all()


def test_entropy_bonus_lowers_loss(batch):
    entropy = np.random.default_rng(0).uniform(0.0, 3.0, size=batch["mask_bt"].shape)
    base, _ = rl.rl_loss(*_args(batch), policy_loss_kwargs=PPO)
    bonus, metrics = rl.rl_loss(*_args(batch), policy_loss_kwargs=PPO, entropy_bt=_f32(entropy), entropy_coef=0.01)
    mask = batch["mask_bt"]
    mean_entropy = (entropy * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["entropy"]), mean_entropy, rtol=1e-5)
    np.testing.assert_allclose(float(base) - float(bonus), 0.01 * mean_entropy, rtol=1e-4)


def test_approx_kl_metric_is_k3_old_to_new(batch):
    lp, old, mask = batch["logprobs_bt"], batch["old_logprobs_bt"], batch["mask_bt"]
    log_r = lp - old
    want = ((np.exp(log_r) - 1 - log_r) * mask).sum() / mask.sum()
    _, metrics = rl.rl_loss(*_args(batch), policy_loss_kwargs=PPO)
    np.testing.assert_allclose(float(metrics["approx_kl"]), want, rtol=1e-5)


def test_on_policy_first_step_is_plain_policy_gradient(batch):
    """At ratio 1 (first update on fresh rollouts) every loss here reduces to the plain
    policy gradient -A grad log pi, averaged over tokens."""
    mask, adv = batch["mask_bt"], batch["adv_b"]
    want = -(adv[:, None] * mask) / mask.sum()
    old = _f32(batch["old_logprobs_bt"])
    for name in ("ppo_clip", "gspo", "cispo"):

        def loss(x, name=name):
            return rl.rl_loss(x, old, _f32(adv), _f32(mask), policy_loss=name, policy_loss_kwargs=PPO)[0]

        grad = jax.grad(loss)(old)
        np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_rl_loss_jits_and_matches_eager(batch):
    kwargs = dict(
        policy_loss="ppo_clip",
        policy_loss_kwargs=dict(clip_low=0.2, clip_high=0.28),
        loss_agg_mode="seq-mean-token-sum-norm",
        kl_coef=0.01,
        kl_type="k3",
        off_policy="tis",
        off_policy_cap=2.0,
    )
    args = _args(batch)
    extra = dict(ref_logprobs_bt=_f32(batch["ref_logprobs_bt"]), sampler_logprobs_bt=_f32(batch["sampler_logprobs_bt"]))
    eager_loss, eager_metrics = rl.rl_loss(*args, **extra, **kwargs)
    jitted = jax.jit(functools.partial(rl.rl_loss, **kwargs))
    loss, metrics = jitted(*args, **extra)
    np.testing.assert_allclose(float(loss), float(eager_loss), rtol=1e-6)
    assert set(metrics) == set(eager_metrics)
    # A traced kl_coef (e.g. a schedule) works too.
    traced = jax.jit(lambda coef: rl.rl_loss(*args, **extra, **{**kwargs, "kl_coef": coef})[0])
    np.testing.assert_allclose(float(traced(0.01)), float(eager_loss), rtol=1e-6)


def test_bad_input_is_named(batch):
    args = _args(batch)
    with pytest.raises(KeyError, match="unknown policy loss 'ppo'; available: .*ppo_clip"):
        rl.rl_loss(*args, policy_loss="ppo")
    with pytest.raises(ValueError, match="policy loss 'ppo_clip': missing a required argument: 'clip_low'"):
        rl.rl_loss(*args)
    with pytest.raises(ValueError, match="policy loss 'gspo': got an unexpected keyword argument 'clip_ratio_c'"):
        rl.rl_loss(*args, policy_loss="gspo", policy_loss_kwargs=dict(**PPO, clip_ratio_c=3.0))
    with pytest.raises(KeyError, match="seq-mean-token-mean"):
        rl.rl_loss(*args, policy_loss_kwargs=PPO, loss_agg_mode="mean")
    with pytest.raises(KeyError, match="low_var_kl"):
        rl.rl_loss(*args, policy_loss_kwargs=PPO, ref_logprobs_bt=args[0], kl_coef=0.1, kl_type="k4")
    with pytest.raises(ValueError, match="needs ref_logprobs_bt"):
        rl.rl_loss(*args, policy_loss_kwargs=PPO, kl_coef=0.1)
    with pytest.raises(ValueError, match="needs entropy_bt"):
        rl.rl_loss(*args, policy_loss_kwargs=PPO, entropy_coef=0.1)
    with pytest.raises(ValueError, match="off_policy='tis' needs sampler_logprobs_bt"):
        rl.rl_loss(*args, policy_loss_kwargs=PPO, off_policy="tis")
    with pytest.raises(KeyError, match="unknown off-policy correction 'is'"):
        rl.rl_loss(*args, policy_loss_kwargs=PPO, off_policy="is", sampler_logprobs_bt=args[1])
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        rl.rl_loss(*args, policy_loss_kwargs=dict(**PPO, clip_ratio_c=0.5))
    with pytest.raises(ValueError, match="clip_low must be in"):
        rl.rl_loss(*args, policy_loss_kwargs=dict(clip_low=1.5, clip_high=0.2))
    with pytest.raises(ValueError, match="old_logprobs shape"):
        rl.rl_loss(args[0], args[1][:, :-1], args[2], args[3], policy_loss_kwargs=PPO)
    with pytest.raises(ValueError, match="advantages must be"):
        rl.rl_loss(args[0], args[1], args[2][:-1], args[3], policy_loss_kwargs=PPO)


def test_registry_accepts_new_losses_and_refuses_clashes():
    @rl.register_policy_loss("test_only_vanilla_pg")
    def vanilla(logprobs_bt, old_logprobs_bt, advantages, mask_bt, *, scale=1.0):
        adv_bt = jnp.broadcast_to(advantages[:, None], mask_bt.shape)
        return -scale * adv_bt * logprobs_bt * mask_bt, {}

    assert rl.get_policy_loss("test_only_vanilla_pg") is vanilla
    assert rl.POLICY_LOSSES.knobs("test_only_vanilla_pg") == ("scale",)
    assert rl.POLICY_LOSSES.bind("test_only_vanilla_pg", {"scale": 2.0}) == {"scale": 2.0}
    with pytest.raises(
        ValueError,
        match=r"'test_only_vanilla_pg': got an unexpected keyword argument 'scal' "
        r"\(its keyword arguments: scale\)",
    ):
        rl.POLICY_LOSSES.bind("test_only_vanilla_pg", {"scal": 2.0})
    with pytest.raises(ValueError, match="already registered"):
        rl.register_policy_loss("ppo_clip")(vanilla)


def test_estimators_declare_their_minimum_group_size():
    assert {name: rl.min_group_size(name) for name in rl.ADVANTAGES.names()} == {
        "dr_grpo": 1,
        "grpo": 2,
        "reinforce_pp_baseline": 1,
        "rloo": 2,
    }
    assert rl.ADVANTAGES.knobs("grpo") == ("epsilon",) and rl.ADVANTAGES.knobs("rloo") == ()


@pytest.mark.parametrize("mode", rl.LOSS_AGGREGATIONS.names())
def test_micro_weights_make_microbatch_losses_sum_to_the_minibatch_loss(batch, mode):
    loss_bt = _f32(np.random.default_rng(1).normal(size=batch["mask_bt"].shape))
    mask_bt = np.array(batch["mask_bt"])
    mask_bt[3] = 0.0  # a row with no valid token
    mask_bt = _f32(mask_bt)
    weight = rl.micro_weight(mode)
    assert weight is not None
    full = rl.aggregate_loss(loss_bt, mask_bt, mode, max_response_len=16)
    parts = [
        rl.aggregate_loss(loss_bt[m::3], mask_bt[m::3], mode, max_response_len=16) * weight(mask_bt[m::3], mask_bt)
        for m in range(3)
    ]
    np.testing.assert_allclose(float(sum(parts)), float(full), rtol=1e-6)
