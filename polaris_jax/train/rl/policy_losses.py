"""Policy-gradient surrogate losses, one registered function per algorithm.

Every loss has the signature

    fn(logprobs_bt, old_logprobs_bt, advantages, mask_bt, **knobs) -> (loss_bt, metrics)

- `logprobs_bt`: log pi_theta(y_t | ...) of the sampled tokens under the params being trained;
- `old_logprobs_bt`: the same under the params that the batch's update started from
  (constants; gradients never flow into them);
- `advantages`: per response `[batch]` or per token `[batch, time]`;
- `mask_bt`: 1 on response tokens that count, 0 on prompt and padding;
- `knobs`: the loss's own hyperparameters, keyword arguments (a GRPO config passes
  `algo.policy_loss_kwargs`, plus `algo.clip_low` / `algo.clip_high` to every loss whose
  signature names them: the clip range has its one default there);
- `loss_bt`: per-token loss to minimise (0 where the mask is 0), reduced by `aggregation.py`;
- `metrics`: scalar `clip_fraction` (share of valid tokens whose update was clipped),
  `approx_kl` (k3 estimate of KL(pi_old || pi_theta) over valid tokens) and `ratio_mean`.

A new loss is one function here (or anywhere) under `@register_policy_loss("name")`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polaris_jax.train.rl.aggregation import masked_mean
from polaris_jax.train.rl.registry import register_policy_loss

# exp() of a log-ratio beyond this is inf in float32 long before it is meaningful.
_MAX_LOG_RATIO = 20.0


def broadcast_advantages(advantages, mask_bt):
    """Per-response [batch] or per-token [batch, time] advantages -> [batch, time] float32."""
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.ndim == 1 and advantages.shape[0] == mask_bt.shape[0]:
        return jnp.broadcast_to(advantages[:, None], mask_bt.shape)
    if advantages.shape == mask_bt.shape:
        return advantages
    raise ValueError(
        f"advantages must be [batch] or [batch, time] matching mask {mask_bt.shape}, got {advantages.shape}"
    )


def _check_inputs(logprobs_bt, old_logprobs_bt, mask_bt, name):
    if logprobs_bt.ndim != 2:
        raise ValueError(f"{name}: logprobs must be [batch, time], got {logprobs_bt.shape}")
    for label, arr in (("old_logprobs", old_logprobs_bt), ("mask", mask_bt)):
        if arr.shape != logprobs_bt.shape:
            raise ValueError(f"{name}: {label} shape {arr.shape} != logprobs shape {logprobs_bt.shape}")


def _check_clip(clip_low, clip_high, name, max_clip_low):
    # Traced hyperparameters cannot be checked; Python numbers from a config can.
    if isinstance(clip_low, (int, float)) and not 0.0 <= clip_low <= max_clip_low:
        raise ValueError(f"{name}: clip_low must be in [0, {max_clip_low}], got {clip_low}")
    if isinstance(clip_high, (int, float)) and clip_high < 0.0:
        raise ValueError(f"{name}: clip_high must be >= 0, got {clip_high}")


def _log_ratio_bt(logprobs_bt, old_logprobs_bt, mask_bt):
    """log(pi_theta / pi_old) per token, 0 on masked tokens so padding garbage cannot overflow."""
    log_ratio_bt = logprobs_bt.astype(jnp.float32) - jax.lax.stop_gradient(old_logprobs_bt.astype(jnp.float32))
    log_ratio_bt = jnp.where(mask_bt > 0, log_ratio_bt, 0.0)
    return jnp.clip(log_ratio_bt, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _kl_k3(log_ratio_bt):
    # k3 = (r - 1) - log r with r = pi_theta / pi_old: unbiased for KL(pi_old || pi_theta)
    # under samples from pi_old, and never negative (Schulman, "Approximating KL divergence").
    return jnp.expm1(log_ratio_bt) - log_ratio_bt


def _metrics(log_ratio_bt, ratio_bt, clipped_bt, mask_bt):
    log_ratio_bt = jax.lax.stop_gradient(log_ratio_bt)
    return {
        "clip_fraction": masked_mean(clipped_bt.astype(jnp.float32), mask_bt),
        "approx_kl": masked_mean(_kl_k3(log_ratio_bt), mask_bt),
        "ratio_mean": masked_mean(jax.lax.stop_gradient(ratio_bt), mask_bt),
    }


@register_policy_loss("ppo_clip")
def ppo_clip(
    logprobs_bt,
    old_logprobs_bt,
    advantages,
    mask_bt,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float | None = None,
):
    """PPO clipped surrogate (Schulman et al. 2017) as used by GRPO (DeepSeekMath eq. 3):
    loss = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), r = pi_theta / pi_old.

    `clip_high > clip_low` is DAPO's clip-higher (Yu et al. 2025, sec. 3.1; 0.2 / 0.28).
    `clip_ratio_c` (> 1; None = off) adds dual-clip (Ye et al. 2020): for A < 0 the loss is also capped
    at -A * clip_ratio_c, so a huge ratio on a bad token cannot blow the update up.
    """
    _check_inputs(logprobs_bt, old_logprobs_bt, mask_bt, "ppo_clip")
    _check_clip(clip_low, clip_high, "ppo_clip", max_clip_low=1.0)
    if clip_ratio_c is not None and isinstance(clip_ratio_c, (int, float)) and clip_ratio_c <= 1.0:
        raise ValueError(f"ppo_clip: clip_ratio_c must be > 1, got {clip_ratio_c}")
    adv_bt = broadcast_advantages(advantages, mask_bt)
    log_ratio_bt = _log_ratio_bt(logprobs_bt, old_logprobs_bt, mask_bt)
    ratio_bt = jnp.exp(log_ratio_bt)
    unclipped_bt = -adv_bt * ratio_bt
    clipped_bt = -adv_bt * jnp.clip(ratio_bt, 1.0 - clip_low, 1.0 + clip_high)
    loss_bt = jnp.maximum(unclipped_bt, clipped_bt)
    was_clipped_bt = clipped_bt > unclipped_bt
    if clip_ratio_c is not None:
        capped_bt = jnp.minimum(loss_bt, -adv_bt * clip_ratio_c)
        was_clipped_bt = was_clipped_bt | ((adv_bt < 0) & (capped_bt < loss_bt))
        loss_bt = jnp.where(adv_bt < 0, capped_bt, loss_bt)
    loss_bt = jnp.where(mask_bt > 0, loss_bt, 0.0)
    return loss_bt, _metrics(log_ratio_bt, ratio_bt, was_clipped_bt, mask_bt)


@register_policy_loss("gspo")
def gspo(
    logprobs_bt,
    old_logprobs_bt,
    advantages,
    mask_bt,
    *,
    clip_low: float,
    clip_high: float,
):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), token form (eq. 13):
    s_i = exp(mean_t log(pi_theta / pi_old)) is the sequence-level ratio, and each token uses
    s_it = sg[s_i] * pi_theta(y_it) / sg[pi_theta(y_it)], whose value is s_i and whose
    gradient is s_i * grad log pi_theta(y_it). loss_it = -min(s_it A, clip(s_it) A).

    With per-response advantages and `seq-mean-token-mean` aggregation this equals the
    sequence-level GSPO objective (eq. 5) in value and gradient. The paper's clip ranges are
    3e-4 (low) and 4e-4 (high), far tighter than token-level PPO's: set them in the config.
    """
    _check_inputs(logprobs_bt, old_logprobs_bt, mask_bt, "gspo")
    _check_clip(clip_low, clip_high, "gspo", max_clip_low=1.0)
    adv_bt = broadcast_advantages(advantages, mask_bt)
    mask_f_bt = mask_bt.astype(jnp.float32)
    log_ratio_bt = _log_ratio_bt(logprobs_bt, old_logprobs_bt, mask_bt)
    seq_log_ratio_b = (log_ratio_bt * mask_f_bt).sum(axis=1) / jnp.maximum(mask_f_bt.sum(axis=1), 1.0)
    logprobs_f_bt = logprobs_bt.astype(jnp.float32)
    log_s_bt = jax.lax.stop_gradient(seq_log_ratio_b)[:, None] + logprobs_f_bt - jax.lax.stop_gradient(logprobs_f_bt)
    s_bt = jnp.exp(jnp.clip(log_s_bt, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped_bt = -adv_bt * s_bt
    clipped_bt = -adv_bt * jnp.clip(s_bt, 1.0 - clip_low, 1.0 + clip_high)
    loss_bt = jnp.where(mask_bt > 0, jnp.maximum(unclipped_bt, clipped_bt), 0.0)
    metrics = _metrics(log_ratio_bt, jnp.exp(log_ratio_bt), clipped_bt > unclipped_bt, mask_bt)
    metrics["seq_ratio_mean"] = jnp.mean(jax.lax.stop_gradient(jnp.exp(seq_log_ratio_b)))
    return loss_bt, metrics


@register_policy_loss("cispo")
def cispo(
    logprobs_bt,
    old_logprobs_bt,
    advantages,
    mask_bt,
    *,
    clip_low: float,
    clip_high: float,
):
    """CISPO (MiniMax-M1, 2025, eq. 4-5): clip the importance weight, not the update, so
    every token keeps a gradient: loss_it = -sg[clip(r_it, 1 - clip_low, 1 + clip_high)]
    * A_it * log pi_theta(y_it). MiniMax-M1 leaves the lower bound open (clip_low = 1,
    lower bound 0) and tunes only the upper one.
    """
    _check_inputs(logprobs_bt, old_logprobs_bt, mask_bt, "cispo")
    _check_clip(clip_low, clip_high, "cispo", max_clip_low=1.0)
    adv_bt = broadcast_advantages(advantages, mask_bt)
    log_ratio_bt = _log_ratio_bt(logprobs_bt, old_logprobs_bt, mask_bt)
    ratio_bt = jnp.exp(log_ratio_bt)
    weight_bt = jax.lax.stop_gradient(jnp.clip(ratio_bt, 1.0 - clip_low, 1.0 + clip_high))
    loss_bt = -weight_bt * adv_bt * logprobs_bt.astype(jnp.float32)
    loss_bt = jnp.where(mask_bt > 0, loss_bt, 0.0)
    was_clipped_bt = (ratio_bt < 1.0 - clip_low) | (ratio_bt > 1.0 + clip_high)
    return loss_bt, _metrics(log_ratio_bt, ratio_bt, was_clipped_bt, mask_bt)
