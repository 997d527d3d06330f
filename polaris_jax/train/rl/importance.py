"""Off-policy corrections against the behaviour policy (the sampler's own per-token log-probabilities).

Rollouts are off-policy for the learner: the sampler computes probabilities with other kernels and
precision, and an asynchronous loop trains on samples drawn by weights up to k versions old. Each
correction turns rho = pi_old / pi_behaviour (pi_old: the learner's recomputed log-probabilities at the
start of the batch's updates, AReaL's proximal policy) into a per-token weight on the policy loss, held
constant (stop-gradient):

  tis        w = min(rho, C)                  truncated IS (Yao et al. 2025, "Your Efficient RL Framework
                                              Secretly Brings You Off-Policy RL Training")
  mis        w = rho if rho <= C else 0       masked IS: tokens past the cap are dropped, not clipped
  decoupled  w = rho                          AReaL's decoupled PPO (Fu et al. 2025): the clip is taken
                                              against the proximal policy pi_old, the behaviour policy
                                              only weights the loss

`algo.off_policy` selects one ("none": no weight), `algo.off_policy_cap` is C.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polaris_jax.registry import Registry
from polaris_jax.train.rl.aggregation import masked_mean

OFF_POLICY = Registry("off-policy correction", inputs=2)  # (rho_bt, mask_bt, *, cap) -> (w_bt, metrics)
OFF_POLICY_NAMES = ("none", "tis", "mis", "decoupled")


def ratio_to_behaviour(old_logprobs_bt, behaviour_logprobs_bt, mask_bt):
    """rho = exp(old - behaviour) per token, 1 on masked tokens (the log clamped so exp stays finite)."""
    if old_logprobs_bt.shape != behaviour_logprobs_bt.shape:
        raise ValueError(
            f"sampler_logprobs shape {behaviour_logprobs_bt.shape} != old_logprobs shape {old_logprobs_bt.shape}"
        )
    log_rho_bt = old_logprobs_bt.astype(jnp.float32) - behaviour_logprobs_bt.astype(jnp.float32)
    return jnp.exp(jnp.minimum(jnp.where(mask_bt > 0, log_rho_bt, 0.0), 20.0))


@OFF_POLICY.register("tis")
def tis(rho_bt, mask_bt, *, cap: float):
    w_bt = jnp.minimum(rho_bt, cap)
    return w_bt, {"off_policy_clipped_fraction": masked_mean((rho_bt > cap).astype(jnp.float32), mask_bt)}


@OFF_POLICY.register("mis")
def mis(rho_bt, mask_bt, *, cap: float):
    keep_bt = rho_bt <= cap
    w_bt = jnp.where(keep_bt, rho_bt, 0.0)
    return w_bt, {"off_policy_masked_fraction": masked_mean((~keep_bt).astype(jnp.float32), mask_bt)}


@OFF_POLICY.register("decoupled")
def decoupled(rho_bt, mask_bt, *, cap: float):
    del cap  # the clip is the policy loss's own, against pi_old
    return rho_bt, {}


def apply_off_policy(loss_bt, old_logprobs_bt, behaviour_logprobs_bt, mask_bt, name: str, cap: float):
    """Reweights a per-token policy loss; returns (loss_bt, metrics incl. the ratio's mean and max)."""
    if name not in OFF_POLICY:
        raise KeyError(f"unknown off-policy correction {name!r}; available: none, {', '.join(OFF_POLICY.names())}")
    if isinstance(cap, (int, float)) and cap <= 0:
        raise ValueError(f"off_policy_cap must be > 0, got {cap}")
    rho_bt = ratio_to_behaviour(old_logprobs_bt, behaviour_logprobs_bt, mask_bt)
    w_bt, metrics = OFF_POLICY.get(name)(rho_bt, mask_bt, cap=cap)
    metrics = {
        **metrics,
        "off_policy_ratio_mean": masked_mean(rho_bt, mask_bt),
        "off_policy_ratio_max": jnp.max(jnp.where(mask_bt > 0, rho_bt, 0.0)),
        "off_policy_weight_mean": masked_mean(w_bt, mask_bt),
    }
    return loss_bt * jax.lax.stop_gradient(w_bt), metrics
