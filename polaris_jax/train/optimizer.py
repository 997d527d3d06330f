"""The optimiser: AdamW, linear warmup then cosine decay to a floor, global-norm clipping; optionally
over a float32 master copy of bf16 params (`master_weights`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from polaris_jax.models.config import ConfigError


def learning_rate_schedule(
    *, peak_lr: float, total_steps: int, warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0
) -> optax.Schedule:
    """Linear warmup over `warmup_ratio * total_steps`, then cosine down to `min_lr_ratio * peak_lr`."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup = int(round(warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak_lr,
        peak_value=peak_lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=peak_lr * min_lr_ratio,
    )


def make_optimizer(
    *,
    peak_lr: float,
    total_steps: int,
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: float | None = 1.0,
    master_weights: bool = False,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(
        peak_lr=peak_lr, total_steps=total_steps, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio
    )
    parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    chain = optax.chain(*parts)
    return (with_master_weights(chain) if master_weights else chain), schedule


class MasterWeightsState(NamedTuple):
    master: optax.Params  # float32 copy of the trainable params
    inner: optax.OptState  # the wrapped optimiser's state, over the master copy


def with_master_weights(inner: optax.GradientTransformation, dtype=jnp.float32) -> optax.GradientTransformation:
    """`inner` run on a `dtype` master copy of the params, kept in the optimiser state (mixed-precision
    training as Megatron and verl do it): gradients are cast up, the master takes the update, and the
    updates returned make `optax.apply_updates(params, updates)` equal the master rounded to the params'
    dtype exactly (the difference of two bf16 numbers is exact in float32, and the sum rounds back to it).
    Small updates that bf16 params would round away accumulate in the master."""

    def init(params):
        master = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
        return MasterWeightsState(master, inner.init(master))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("with_master_weights needs the params in update()")
        grads = jax.tree.map(lambda g: g.astype(dtype), grads)
        updates, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        deltas = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(dtype) - p.astype(dtype), master, params)
        return deltas, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init, update)


def optimizer_from_config(
    optimizer_config, total_steps: int, param_dtype: str = "float32"
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer` from a config's `optimizer` section (peak_lr, warmup_ratio, min_lr_ratio, weight_decay,
    b1, b2, eps, grad_clip_norm; 0 = no clipping; master_weights) over `total_steps` optimiser updates.
    `param_dtype` is model.param_dtype: master weights are for bf16/fp16 params only."""
    o = optimizer_config
    check_master_weights(o, param_dtype)
    return make_optimizer(
        peak_lr=o.peak_lr,
        total_steps=total_steps,
        warmup_ratio=o.warmup_ratio,
        min_lr_ratio=o.min_lr_ratio,
        weight_decay=o.weight_decay,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        grad_clip_norm=o.grad_clip_norm or None,
        master_weights=bool(o.get("master_weights", False)),
    )


def check_master_weights(optimizer_config, param_dtype: str) -> None:
    """optimizer.master_weights is for bf16/fp16 params: a float32 copy of float32 params doubles them for nothing."""
    if optimizer_config.get("master_weights", False) and param_dtype not in ("bfloat16", "float16"):
        raise ConfigError(
            f"optimizer.master_weights=True keeps a float32 copy of bfloat16/float16 params, but "
            f"model.param_dtype={param_dtype!r}: set model.param_dtype=bfloat16 or drop master_weights"
        )
