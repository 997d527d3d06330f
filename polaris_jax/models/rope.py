"""Rotary position embeddings (half-split), with YaRN scaling computed as transformers does."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def _yarn_inv_freq(dim: int, base: float, scaling: tuple) -> tuple[np.ndarray, float]:
    """YaRN (arXiv:2309.00071) frequencies and cos/sin scale, following transformers' `_compute_yarn_parameters`."""
    _, factor, original_max_pos, beta_fast, beta_slow, attention_factor, truncate = scaling
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def inverse_frequencies(config) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [head_dim/2], cos/sin scale)."""
    dim = config.head_dim
    if config.rope_scaling is None:
        return (1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32), 1.0
    return _yarn_inv_freq(dim, config.rope_theta, config.rope_scaling)


def rope_cos_sin(config, positions_bt: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [B, T, head_dim] in float32."""
    inv_freq, scale = inverse_frequencies(config)
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles_btd = jnp.concatenate([angles_btf, angles_btf], axis=-1)
    return jnp.cos(angles_btd) * scale, jnp.sin(angles_btd) * scale


def apply_rope(x_btnd: jnp.ndarray, cos_btd: jnp.ndarray, sin_btd: jnp.ndarray) -> jnp.ndarray:
    half = x_btnd.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnd[..., half:], x_btnd[..., :half]], axis=-1)
    cos, sin = cos_btd[:, :, None, :], sin_btd[:, :, None, :]
    return (x_btnd.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_btnd.dtype)
