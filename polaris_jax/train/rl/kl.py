"""KL-to-reference penalties.

KL estimators take the policy's and the reference model's log-probabilities of the sampled
tokens and return a per-token estimate of KL(pi_theta || pi_ref) (Schulman, "Approximating
KL divergence", 2020):
- `k1`: log pi_theta - log pi_ref (unbiased, high variance, can be negative);
- `k2`: 0.5 * (log pi_theta - log pi_ref)^2 (biased, low variance, >= 0);
- `k3` / `low_var_kl`: r - log r - 1 with r = pi_ref / pi_theta (unbiased, >= 0), the GRPO
  penalty of DeepSeekMath eq. 4. As in verl, the log-ratio is clamped to [-20, 20] and the
  estimate to [-10, 10] so one wild token cannot dominate the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polaris_jax.train.rl.registry import get_kl_estimator, register_kl_estimator


def _log_ratio(logprobs_bt, ref_logprobs_bt):
    if logprobs_bt.shape != ref_logprobs_bt.shape:
        raise ValueError(f"ref_logprobs shape {ref_logprobs_bt.shape} != logprobs shape {logprobs_bt.shape}")
    return logprobs_bt.astype(jnp.float32) - jax.lax.stop_gradient(ref_logprobs_bt.astype(jnp.float32))


@register_kl_estimator("k1")
def kl_k1(logprobs_bt, ref_logprobs_bt):
    return _log_ratio(logprobs_bt, ref_logprobs_bt)


@register_kl_estimator("k2")
def kl_k2(logprobs_bt, ref_logprobs_bt):
    return 0.5 * jnp.square(_log_ratio(logprobs_bt, ref_logprobs_bt))


@register_kl_estimator("low_var_kl")
@register_kl_estimator("k3")
def kl_k3(logprobs_bt, ref_logprobs_bt):
    ref_minus_policy_bt = jnp.clip(-_log_ratio(logprobs_bt, ref_logprobs_bt), -20.0, 20.0)
    kl_bt = jnp.exp(ref_minus_policy_bt) - ref_minus_policy_bt - 1.0
    return jnp.clip(kl_bt, -10.0, 10.0)


def kl_penalty(logprobs_bt, ref_logprobs_bt, mask_bt, kl_type: str = "k3"):
    """Per-token KL estimate, 0 on masked tokens."""
    kl_bt = get_kl_estimator(kl_type)(logprobs_bt, ref_logprobs_bt)
    return jnp.where(mask_bt > 0, kl_bt, 0.0)
