"""Reduce a per-token loss [batch, time] to a scalar, one registered function per mode.

The three modes differ in how long and short responses are weighted:
- `token-mean`: every valid token counts once (DAPO, Yu et al. 2025, eq. 8).
- `seq-mean-token-mean`: mean over each response's tokens, then over responses
  (the original GRPO objective, DeepSeekMath eq. 3); long responses get less weight per token.
- `seq-mean-token-sum-norm`: sum over each response's tokens divided by a constant
  (the generation budget), then mean over responses (Dr.GRPO, Liu et al. 2025, sec. 3.1),
  which removes the length bias of `seq-mean-token-mean`.

Each mode registers its `micro_weight(mask_br, total_mask_br)`: the share of the minibatch's
normaliser (valid tokens, responses with a valid token, or rows) that a microbatch holds, so
that the microbatch losses, each times its weight, sum to the minibatch loss.
"""

from __future__ import annotations

import jax.numpy as jnp

from polaris_jax.train.rl.registry import get_loss_aggregation, register_loss_aggregation


def _check(loss_bt, mask_bt):
    if loss_bt.ndim != 2 or loss_bt.shape != mask_bt.shape:
        raise ValueError(f"loss and mask must both be [batch, time]; got {loss_bt.shape} and {mask_bt.shape}")
    return loss_bt, mask_bt.astype(loss_bt.dtype)


def _rows_with_tokens(mask_bt):
    return jnp.sum((jnp.sum(mask_bt, axis=-1) > 0).astype(jnp.float32))


def token_share(mask_bt, total_mask_bt):
    return jnp.sum(mask_bt) / jnp.maximum(jnp.sum(total_mask_bt), 1.0)


def row_with_tokens_share(mask_bt, total_mask_bt):
    return _rows_with_tokens(mask_bt) / jnp.maximum(_rows_with_tokens(total_mask_bt), 1.0)


def row_share(mask_bt, total_mask_bt):
    return mask_bt.shape[0] / total_mask_bt.shape[0]


@register_loss_aggregation("token-mean", micro_weight=token_share)
def token_mean(loss_bt, mask_bt, *, max_response_len: int | None = None):
    del max_response_len
    loss_bt, mask_bt = _check(loss_bt, mask_bt)
    return (loss_bt * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0)


@register_loss_aggregation("seq-mean-token-mean", micro_weight=row_with_tokens_share)
def seq_mean_token_mean(loss_bt, mask_bt, *, max_response_len: int | None = None):
    del max_response_len
    loss_bt, mask_bt = _check(loss_bt, mask_bt)
    tokens_b = mask_bt.sum(axis=1)
    seq_loss_b = (loss_bt * mask_bt).sum(axis=1) / jnp.maximum(tokens_b, 1.0)
    # Rows with no valid token (padding rows) are left out of the mean over responses.
    has_tokens_b = (tokens_b > 0).astype(loss_bt.dtype)
    return (seq_loss_b * has_tokens_b).sum() / jnp.maximum(has_tokens_b.sum(), 1.0)


@register_loss_aggregation("seq-mean-token-sum-norm", micro_weight=row_share)
def seq_mean_token_sum_norm(loss_bt, mask_bt, *, max_response_len: int | None = None):
    """`max_response_len` is the constant normaliser; it defaults to the padded length T.
    The mean over responses divides by the number of rows, also a constant."""
    loss_bt, mask_bt = _check(loss_bt, mask_bt)
    norm = loss_bt.shape[1] if max_response_len is None else max_response_len
    if norm <= 0:
        raise ValueError(f"max_response_len must be positive, got {norm}")
    seq_sum_b = (loss_bt * mask_bt).sum(axis=1)
    return seq_sum_b.sum() / (loss_bt.shape[0] * norm)


def aggregate_loss(loss_bt, mask_bt, mode: str = "token-mean", *, max_response_len=None):
    """Per-token loss [batch, time] -> scalar, by registered mode name."""
    return get_loss_aggregation(mode)(loss_bt, mask_bt, max_response_len=max_response_len)


def masked_mean(values_bt, mask_bt):
    """Mean over valid tokens; used for metrics, where the mode does not matter."""
    mask_bt = mask_bt.astype(values_bt.dtype)
    return (values_bt * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0)
