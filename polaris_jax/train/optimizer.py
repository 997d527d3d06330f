"""The optimiser: AdamW, linear warmup then cosine decay to a floor, global-norm clipping."""

from __future__ import annotations

import optax


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
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(
        peak_lr=peak_lr, total_steps=total_steps, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio
    )
    parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts), schedule


def optimizer_from_config(optimizer_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer` from a config's `optimizer` section (peak_lr, warmup_ratio, min_lr_ratio, weight_decay,
    b1, b2, eps, grad_clip_norm; 0 = no clipping) over `total_steps` optimiser updates."""
    o = optimizer_config
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
    )
