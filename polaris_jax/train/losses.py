"""Token losses computed from hidden states in sequence chunks, shared by the SFT and GRPO steps, and the
microbatch gradient accumulation they share (their jitted shape is `partitioning.jit_step`).

A 151k-entry vocabulary makes float32 logits [B, T, V] the largest tensor of a step (32K tokens ->
20 GB). Here the final hidden states are scanned in chunks of `chunk_size` positions; each chunk goes
through `lm_head`, is reduced to per-token numbers (target log-probability, log-normaliser, entropy)
and dropped. The chunk body is rematerialised, so the backward pass also holds one chunk of logits.

Conventions: `targets_bt[b, t]` is the token predicted at position t (the next token of the same
sequence); `loss_mask_bt` (or `weights_bt`) is 1 where that prediction is trained on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from polaris_jax.models.context_parallel import sequence_axis
from polaris_jax.models.sharding import constrain
from polaris_jax.models.transformer import forward, lm_head


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """How a token loss is computed; hashable, so it can be closed over by a jitted step."""

    chunk_size: int = 512  # sequence positions per lm_head chunk
    z_loss_coef: float = 0.0  # PaLM's z-loss: coef * mean(logsumexp(logits)^2)
    router_aux_coef: float | None = None  # MoE load balancing; None takes the model config's coefficient
    temperature: float = 1.0  # logits are divided by this before the softmax (GRPO samples at T != 1)

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def _chunk_stats(config, params, hidden_bcd, targets_bc, temperature: float, with_entropy: bool, adapter_rows_b):
    logits_bcv = lm_head(config, params, hidden_bcd, adapter_rows_b)
    if temperature != 1.0:
        logits_bcv = logits_bcv / temperature
    lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    target_logit_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
    out = {"logprobs": target_logit_bc - lse_bc, "lse": lse_bc}
    if with_entropy:
        probs_bcv = jnp.exp(logits_bcv - lse_bc[..., None])
        out["entropy"] = lse_bc - jnp.sum(probs_bcv * logits_bcv, axis=-1)
    return out


def hidden_token_stats(
    config,
    params,
    hidden_btd,
    targets_bt,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
    with_entropy: bool = False,
    adapter_rows_b=None,
) -> dict:
    """Per-token {logprobs, lse[, entropy]} float32 [B, T] from final hidden states [B, T, D], computed in
    j chunks of c positions (`_jbscd`). adapter_rows_b: multi-LoRA rows (`models.transformer.forward`).

    When a `sequence` mesh axis splits the rows into s parts, each part is chunked on its own and a chunk
    takes c positions of every part ([B, s, c]): each device then computes its own tokens' logits. A chunk
    of c consecutive positions would lie on one device, and every device would compute (and hold) it."""
    b, t, d = hidden_btd.shape
    split = sequence_axis()
    parts = split[1] if split is not None and t % split[1] == 0 else 1
    part_len = t // parts
    chunk = min(chunk_size, part_len)
    num_chunks = -(-part_len // chunk)
    pad = num_chunks * chunk - part_len
    hidden_bsld = hidden_btd.reshape(b, parts, part_len, d)
    targets_bsl = targets_bt.reshape(b, parts, part_len)
    if pad:
        hidden_bsld = jnp.pad(hidden_bsld, ((0, 0), (0, 0), (0, pad), (0, 0)))
        targets_bsl = jnp.pad(targets_bsl, ((0, 0), (0, 0), (0, pad)))
    hidden_jbscd = hidden_bsld.reshape(b, parts, num_chunks, chunk, d).transpose(2, 0, 1, 3, 4)
    targets_jbsc = targets_bsl.reshape(b, parts, num_chunks, chunk).transpose(2, 0, 1, 3)
    hidden_jbscd = constrain(hidden_jbscd, (None, "batch", "length", None, "embed"))
    targets_jbsc = constrain(targets_jbsc, (None, "batch", "length", None))

    @jax.checkpoint
    def body(carry, xs):
        hidden_bscd, targets_bsc = xs
        hidden_bcd = hidden_bscd.reshape(b, parts * chunk, d)
        stats = _chunk_stats(
            config, params, hidden_bcd, targets_bsc.reshape(b, parts * chunk), temperature, with_entropy, adapter_rows_b
        )
        return carry, jax.tree.map(lambda x: x.reshape(b, parts, chunk), stats)

    _, stats_jbsc = jax.lax.scan(body, None, (hidden_jbscd, targets_jbsc))
    return jax.tree.map(
        lambda x: x.transpose(1, 2, 0, 3).reshape(b, parts, num_chunks * chunk)[:, :, :part_len].reshape(b, t),
        stats_jbsc,
    )


def token_stats(
    config,
    params,
    tokens_bt,
    positions_bt,
    segment_ids_bt,
    targets_bt,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
    with_entropy: bool = False,
    adapter_rows_b=None,
) -> dict:
    """Runs the model and returns per-token {logprobs, lse[, entropy]} [B, T] plus `router_aux_loss` (scalar)."""
    hidden_btd, _, aux = forward(
        config,
        params,
        tokens_bt,
        positions_bt,
        segment_ids_bt=segment_ids_bt,
        return_hidden=True,
        return_aux=True,
        adapter_rows_b=adapter_rows_b,
    )
    stats = hidden_token_stats(
        config,
        params,
        hidden_btd,
        targets_bt,
        chunk_size=chunk_size,
        temperature=temperature,
        with_entropy=with_entropy,
        adapter_rows_b=adapter_rows_b,
    )
    stats["router_aux_loss"] = aux["router_aux_loss"]
    if "router" in aux:
        stats["router"] = aux["router"]
    return stats


def router_aux_coef(config, settings: LossSettings) -> float:
    if not config.is_moe:
        return 0.0
    return config.router_aux_loss_coef if settings.router_aux_coef is None else settings.router_aux_coef


def sft_loss(
    config,
    params,
    batch: dict,
    settings: LossSettings = LossSettings(),
    *,
    num_target_tokens=None,
    aux_weight: float = 1.0,
):
    """Token-mean cross entropy over `loss_mask_bt`, plus optional z-loss and MoE router loss.

    Args:
      batch: tokens_bt, positions_bt, segment_ids_bt, targets_bt, loss_mask_bt ([B, T] each).
      num_target_tokens: the denominator of the token mean. Gradient accumulation passes the count
        over the whole batch so that summing microbatch losses gives the full-batch token mean.
      aux_weight: scale of the router loss (1 / number of microbatches when accumulating).
    Returns:
      (loss, terms) where terms holds the summed numerators and the router loss for metrics.
    """
    mask_bt = batch["loss_mask_bt"].astype(jnp.float32)
    stats = token_stats(
        config,
        params,
        batch["tokens_bt"],
        batch["positions_bt"],
        batch["segment_ids_bt"],
        batch["targets_bt"],
        chunk_size=settings.chunk_size,
        temperature=settings.temperature,
    )
    if num_target_tokens is None:
        num_target_tokens = jnp.maximum(jnp.sum(mask_bt), 1.0)
    ce_sum = -jnp.sum(stats["logprobs"] * mask_bt)
    z_sum = jnp.sum(jnp.square(stats["lse"]) * mask_bt)
    router = stats["router_aux_loss"]
    loss = (ce_sum + settings.z_loss_coef * z_sum) / num_target_tokens
    loss = loss + aux_weight * router_aux_coef(config, settings) * router
    terms = {"ce_sum": ce_sum, "z_sum": z_sum, "router_aux_loss": aux_weight * router}
    if "router" in stats:  # additive counts: microbatch sums stay exact (models.moe.routing_metrics)
        terms["router"] = jax.lax.stop_gradient(stats["router"])
    return loss, terms


def split_microbatches(batch, microbatches: int):
    """[B, ...] -> [M, B/M, ...] for every array of a pytree (a dict, an `UpdateBatch`, ...); microbatch m
    takes rows m, m+M, ... so each keeps every data shard busy."""

    def split(x_bt):
        b = x_bt.shape[0]
        if b % microbatches:
            raise ValueError(f"batch of {b} rows does not split into {microbatches} microbatches")
        return x_bt.reshape(b // microbatches, microbatches, *x_bt.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn, trainable, batch, microbatches: int, microbatch_sharding=None):
    """Sum over microbatches of (grad, aux) of `loss_fn(trainable, microbatch) -> (loss, aux)`.

    `microbatch_sharding`, if given, pins every [M, B/M, ...] array of the split batch.
    Gradients are accumulated in float32 and returned in the trainable dtype."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (loss, aux), grads = grad_fn(trainable, batch)
        return loss, aux, grads
    micro = split_microbatches(batch, microbatches)
    if microbatch_sharding is not None:
        micro = jax.lax.with_sharding_constraint(micro, jax.tree.map(lambda _: microbatch_sharding, micro))
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    _, aux_shape = jax.eval_shape(lambda: loss_fn(trainable, jax.tree.map(lambda x: x[0], micro)))
    carry0 = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape), zeros)

    def body(carry, mb):
        loss_acc, aux_acc, grad_acc = carry
        (loss, aux), grads = grad_fn(trainable, mb)
        grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
        return (loss_acc + loss, jax.tree.map(jnp.add, aux_acc, aux), grad_acc), None

    (loss, aux, grads), _ = jax.lax.scan(body, carry0, micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    return loss, aux, grads
