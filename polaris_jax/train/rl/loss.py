"""The full RL objective for one minibatch: what the GRPO train step differentiates.

    loss = agg(policy_loss_bt * w_bt) + kl_coef * agg(kl_bt) - entropy_coef * agg(H_bt)

w_bt is the off-policy correction's weight against the sampler (importance.py), 1 without one.

`agg` is the chosen aggregation mode, applied to every term so that all three weigh tokens
the same way. All hyperparameters are plain arguments (Python numbers and names are
static under jit; numbers may also be traced scalars, for schedules).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from polaris_jax.train.rl.aggregation import aggregate_loss, masked_mean
from polaris_jax.train.rl.importance import apply_off_policy
from polaris_jax.train.rl.kl import kl_penalty
from polaris_jax.train.rl.registry import POLICY_LOSSES


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def rl_loss(
    logprobs_bt,
    old_logprobs_bt,
    advantages,
    mask_bt,
    *,
    policy_loss: str = "ppo_clip",
    policy_loss_kwargs: Mapping[str, Any] | None = None,
    loss_agg_mode: str = "token-mean",
    max_response_len: int | None = None,
    ref_logprobs_bt=None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy_bt=None,
    entropy_coef: float = 0.0,
    sampler_logprobs_bt=None,
    off_policy: str = "none",
    off_policy_cap: float = 2.0,
):
    """Returns (scalar loss, dict of scalar metrics).

    Args:
      logprobs_bt: log-probs of the sampled tokens under the params being differentiated.
      old_logprobs_bt: the same under the params at the start of this batch's updates.
      advantages: `[batch]` per response or `[batch, time]` per token.
      mask_bt: 1 on response tokens that count (after overlong filtering), else 0.
      policy_loss: registered name: `ppo_clip`, `gspo`, `cispo`, ...
      policy_loss_kwargs: the policy loss's own keyword arguments, e.g. `clip_low`, `clip_high`
        (and `clip_ratio_c` for dual-clip `ppo_clip`); checked against its signature.
      loss_agg_mode: `token-mean`, `seq-mean-token-mean` or `seq-mean-token-sum-norm`.
      max_response_len: constant normaliser of `seq-mean-token-sum-norm` (default: T).
      ref_logprobs_bt, kl_coef, kl_type: KL-to-reference penalty (`k1`, `k2`, `k3`).
      entropy_bt, entropy_coef: per-token entropy of the policy and the bonus on it.
      sampler_logprobs_bt, off_policy, off_policy_cap: the correction against the sampler's
        log-probs (`tis`, `mis`, `decoupled`; see importance.py) and its cap C.
    """
    kwargs = POLICY_LOSSES.bind(policy_loss, policy_loss_kwargs or {})
    loss_bt, metrics = POLICY_LOSSES.get(policy_loss)(logprobs_bt, old_logprobs_bt, advantages, mask_bt, **kwargs)
    metrics = dict(metrics)

    if off_policy != "none":
        if sampler_logprobs_bt is None:
            raise ValueError(f"off_policy={off_policy!r} needs sampler_logprobs_bt")
        loss_bt, off_metrics = apply_off_policy(
            loss_bt, old_logprobs_bt, sampler_logprobs_bt, mask_bt, off_policy, off_policy_cap
        )
        metrics.update(off_metrics)

    def agg(values_bt):
        return aggregate_loss(values_bt, mask_bt, loss_agg_mode, max_response_len=max_response_len)

    pg_loss = agg(loss_bt)
    total = pg_loss
    metrics["policy_loss"] = pg_loss

    if ref_logprobs_bt is None:
        if not _is_zero(kl_coef):
            raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs_bt")
    else:
        kl_bt = kl_penalty(logprobs_bt, ref_logprobs_bt, mask_bt, kl_type)
        kl = agg(kl_bt)
        metrics["kl_to_ref"] = kl
        if not _is_zero(kl_coef):
            total = total + kl_coef * kl

    if entropy_bt is None:
        if not _is_zero(entropy_coef):
            raise ValueError(f"entropy_coef={entropy_coef} needs entropy_bt")
    else:
        if entropy_bt.shape != mask_bt.shape:
            raise ValueError(f"entropy shape {entropy_bt.shape} != mask shape {mask_bt.shape}")
        metrics["entropy"] = masked_mean(entropy_bt, mask_bt)
        if not _is_zero(entropy_coef):
            total = total - entropy_coef * agg(entropy_bt)

    metrics["loss"] = total
    metrics["response_tokens"] = jnp.sum(mask_bt.astype(jnp.float32))
    return total, metrics
