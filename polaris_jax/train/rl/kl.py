"""KL-to-reference penalties and the entropy of the policy.

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

from polaris_jax.train.rl.aggregation import aggregate_loss
from polaris_jax.train.rl.registry import get_kl_estimator, register_kl_estimator


def _log_ratio(logprobs_bt, ref_logprobs_bt):
    if logprobs_bt.shape != ref_logprobs_bt.shape:
        raise ValueError(
            f"ref_logprobs shape {ref_logprobs_bt.shape} != logprobs shape {logprobs_bt.shape}"
        )
    return logprobs_bt.astype(jnp.float32) - jax.lax.stop_gradient(
        ref_logprobs_bt.astype(jnp.float32)
    )


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


def token_entropy(logits_btv):
    """Entropy of the softmax over the vocabulary at each position, [batch, time], float32.
    Pass logits already divided by the sampling temperature if the policy samples with one."""
    logits_btv = logits_btv.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    probs_btv = jax.nn.softmax(logits_btv, axis=-1)
    return log_z_bt - (probs_btv * logits_btv).sum(axis=-1)


def entropy_bonus(logits_btv, mask_bt, loss_agg_mode: str = "token-mean", *, max_response_len=None):
    """Aggregated policy entropy (scalar, differentiable). Subtract `coef * entropy_bonus`
    from the loss to reward exploration."""
    if logits_btv.ndim != 3 or logits_btv.shape[:2] != mask_bt.shape:
        raise ValueError(
            f"logits must be [batch, time, vocab] matching mask {mask_bt.shape}, "
            f"got {logits_btv.shape}"
        )
    return aggregate_loss(
        token_entropy(logits_btv), mask_bt, loss_agg_mode, max_response_len=max_response_len
    )
