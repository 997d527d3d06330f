"""The full RL objective for one minibatch: what the GRPO train step differentiates.

    loss = agg(policy_loss_bt * tis_w_bt) + kl_coef * agg(kl_bt) - entropy_coef * agg(H_bt)

`agg` is the chosen aggregation mode, applied to every term so that all three weigh tokens
the same way. All hyperparameters are plain arguments (Python numbers and names are
static under jit; numbers may also be traced scalars, for schedules).
"""

from __future__ import annotations

import jax.numpy as jnp

from polaris_jax.train.rl.aggregation import aggregate_loss, masked_mean
from polaris_jax.train.rl.importance import apply_tis
from polaris_jax.train.rl.kl import kl_penalty, token_entropy
from polaris_jax.train.rl.registry import get_policy_loss


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def rl_loss(
    logprobs_bt,
    old_logprobs_bt,
    advantages,
    mask_bt,
    *,
    policy_loss: str = "ppo_clip",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    max_response_len: int | None = None,
    ref_logprobs_bt=None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    logits_btv=None,
    entropy_bt=None,
    entropy_coef: float = 0.0,
    sampler_logprobs_bt=None,
    tis_cap: float | None = None,
):
    """Returns (scalar loss, dict of scalar metrics).

    Args:
      logprobs_bt: log-probs of the sampled tokens under the params being differentiated.
      old_logprobs_bt: the same under the params at the start of this batch's updates.
      advantages: `[batch]` per response or `[batch, time]` per token.
      mask_bt: 1 on response tokens that count (after overlong filtering), else 0.
      policy_loss: registered name: `ppo_clip`, `gspo`, `cispo`, ...
      clip_low, clip_high, clip_ratio_c: clip range (and dual-clip) of the policy loss.
      loss_agg_mode: `token-mean`, `seq-mean-token-mean` or `seq-mean-token-sum-norm`.
      max_response_len: constant normaliser of `seq-mean-token-sum-norm` (default: T).
      ref_logprobs_bt, kl_coef, kl_type: KL-to-reference penalty (`k1`, `k2`, `k3`).
      logits_btv or entropy_bt, entropy_coef: entropy bonus; pass either the logits or a
        precomputed `token_entropy(logits_btv)` (cheaper when computed in chunks).
      sampler_logprobs_bt, tis_cap: truncated importance-sampling correction against the
        sampler's log-probs (see importance.py); both or neither.
    """
    loss_bt, metrics = get_policy_loss(policy_loss)(
        logprobs_bt,
        old_logprobs_bt,
        advantages,
        mask_bt,
        clip_low=clip_low,
        clip_high=clip_high,
        clip_ratio_c=clip_ratio_c,
    )
    metrics = dict(metrics)

    if (tis_cap is None) != (sampler_logprobs_bt is None):
        raise ValueError("TIS needs both sampler_logprobs_bt and tis_cap, or neither")
    if tis_cap is not None:
        loss_bt, tis_metrics = apply_tis(
            loss_bt, old_logprobs_bt, sampler_logprobs_bt, mask_bt, tis_cap
        )
        metrics.update(tis_metrics)

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

    if logits_btv is not None and entropy_bt is not None:
        raise ValueError("pass logits_btv or entropy_bt, not both")
    if logits_btv is not None:
        entropy_bt = token_entropy(logits_btv)
    if entropy_bt is None:
        if not _is_zero(entropy_coef):
            raise ValueError(f"entropy_coef={entropy_coef} needs logits_btv or entropy_bt")
    else:
        if entropy_bt.shape != mask_bt.shape:
            raise ValueError(f"entropy shape {entropy_bt.shape} != mask shape {mask_bt.shape}")
        metrics["entropy"] = masked_mean(entropy_bt, mask_bt)
        if not _is_zero(entropy_coef):
            total = total - entropy_coef * agg(entropy_bt)

    metrics["loss"] = total
    metrics["response_tokens"] = jnp.sum(mask_bt.astype(jnp.float32))
    return total, metrics
