"""Truncated importance sampling (TIS) against the sampler's own log-probabilities.

The sampler (bf16 KV cache, different kernels, a different sharding) and the trainer compute
slightly different probabilities for the same params, so rollouts are off-policy for the
trainer even at the first update. Yao et al. 2025, "Your Efficient RL Framework Secretly
Brings You Off-Policy RL Training", correct this by weighting each token's loss with
w = min(pi_old(y) / pi_sampler(y), C), held constant (stop-gradient), where pi_old is the
trainer's recomputed log-probability and C (e.g. 2) caps the variance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polaris_jax.train.rl.aggregation import masked_mean


def tis_weights(old_logprobs_bt, sampler_logprobs_bt, mask_bt, cap: float):
    """Per-token weights min(exp(old - sampler), cap), 1 on masked tokens, no gradient."""
    if old_logprobs_bt.shape != sampler_logprobs_bt.shape:
        raise ValueError(
            f"sampler_logprobs shape {sampler_logprobs_bt.shape} != old_logprobs shape {old_logprobs_bt.shape}"
        )
    if isinstance(cap, (int, float)) and cap <= 0:
        raise ValueError(f"TIS cap must be positive, got {cap}")
    log_w_bt = old_logprobs_bt.astype(jnp.float32) - sampler_logprobs_bt.astype(jnp.float32)
    log_w_bt = jnp.where(mask_bt > 0, log_w_bt, 0.0)
    # Clamping the log first keeps exp finite; the cap makes larger values irrelevant anyway.
    w_bt = jnp.minimum(jnp.exp(jnp.minimum(log_w_bt, 20.0)), cap)
    return jax.lax.stop_gradient(w_bt)


def apply_tis(loss_bt, old_logprobs_bt, sampler_logprobs_bt, mask_bt, cap: float):
    """Reweight a per-token policy loss; returns (loss_bt, metrics)."""
    w_bt = tis_weights(old_logprobs_bt, sampler_logprobs_bt, mask_bt, cap)
    metrics = {
        "tis_weight_mean": masked_mean(w_bt, mask_bt),
        "tis_capped_fraction": masked_mean((w_bt >= cap).astype(jnp.float32), mask_bt),
    }
    return loss_bt * w_bt, metrics
