"""Whole-vocabulary reductions for the sampler (argmax, softmax mass, inverse-CDF draw), done block by block.

A decode step reduces [B, V] logits several times (V = 151,669 for Qwen). On XLA:CPU a flat index-min or
argmax costs 15-34 ms at B = 64, and a cumulative sum 70-97 ms (lowered as log2(V) scan passes), against
1-4 ms for a max or an exp-sum over a [B, V / L, L] view. So each reduction runs in two levels: one
vectorised pass over the view gives per-block maxima or masses, then the exact work (first index,
cumulative sum) runs inside the one block each row picked. The block length L divides V where V has a
divisor in range, so the view is a free reshape; otherwise the tail is padded (a copy of the logits).
Results are exactly those of the flat definitions, up to float rounding in the sums.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_BLOCK_RANGE = (32, 8192)
_PAD_BLOCK = 512


def block_length(vocab: int) -> int:
    """The divisor of `vocab` in _BLOCK_RANGE (at least two blocks) nearest sqrt(vocab) in ratio, which
    balances the two levels; with no such divisor, the whole row up to _BLOCK_RANGE[1] ids, else
    _PAD_BLOCK (the view then pads the tail)."""
    low, high = _BLOCK_RANGE
    divisors = [d for d in range(low, min(high, vocab // 2) + 1) if vocab % d == 0]
    if divisors:
        return min(divisors, key=lambda d: abs(math.log(d) - 0.5 * math.log(vocab)))
    return vocab if vocab <= high else _PAD_BLOCK


def vocab_view(x_bv, fill):
    """[B, V] -> [B, C, L] with L = block_length(V); a tail that L does not divide is padded with `fill`."""
    batch, vocab = x_bv.shape
    length = block_length(vocab)
    blocks = -(-vocab // length)
    if blocks * length != vocab:
        x_bv = jnp.pad(x_bv, ((0, 0), (0, blocks * length - vocab)), constant_values=fill)
    return x_bv.reshape(batch, blocks, length)


def _block_of_row(x_bcl, block_b):
    return jnp.take_along_axis(x_bcl, block_b[:, None, None], axis=1)[:, 0]


def _first_true(mask_bn):
    """Index of the first True along the last axis (its length where there is none)."""
    size = mask_bn.shape[-1]
    return jnp.min(jnp.where(mask_bn, jnp.arange(size, dtype=jnp.int32), size), axis=-1)


def _last_positive(mass_bn):
    size = mass_bn.shape[-1]
    return jnp.max(jnp.where(mass_bn > 0, jnp.arange(size, dtype=jnp.int32), 0), axis=-1)


def first_argmax(x_bv):
    """`jnp.argmax` over the last axis (the first index of the maximum; an all-NaN row gives the last id)."""
    vocab = x_bv.shape[-1]
    x_bcl = vocab_view(x_bv, -jnp.inf)
    block_max_bc = jnp.max(x_bcl, axis=-1)
    max_b1 = jnp.max(block_max_bc, axis=-1, keepdims=True)
    block_b = jnp.minimum(_first_true(block_max_bc == max_b1), x_bcl.shape[1] - 1)
    inner_b = _first_true(_block_of_row(x_bcl, block_b) == max_b1)
    return jnp.minimum(block_b * x_bcl.shape[2] + inner_b, vocab - 1)


def softmax_blocks(logits_bv, inv_temperature_b1):
    """The pieces of softmax(logits_bv * inv_temperature_b1) that drawing and scoring share: the [B, C, L]
    view of the logits, their row max [B, 1] and each block's mass sum(exp((x - max) * inv_t)) [B, C].
    Scaling inside the exp keeps the scaled logits from being written out (a copy of [B, V])."""
    logits_bcl = vocab_view(logits_bv, -jnp.inf)
    max_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    shifted_bcl = (logits_bcl - max_b1[:, :, None]) * inv_temperature_b1[:, :, None]
    return logits_bcl, max_b1, jnp.sum(jnp.exp(shifted_bcl), axis=-1)


def log_softmax_at(logits_bv, tokens_b, inv_temperature_b1, blocks):
    """log softmax(logits_bv * inv_t)[b, tokens_b[b]] from `softmax_blocks` of the same logits."""
    _, max_b1, block_mass_bc = blocks
    chosen_b = jnp.take_along_axis(logits_bv, tokens_b[:, None], axis=-1)[:, 0]
    return (chosen_b - max_b1[:, 0]) * inv_temperature_b1[:, 0] - jnp.log(jnp.sum(block_mass_bc, axis=-1))


def inverse_cdf_draw(logits_bv, keys_b, inv_temperature_b1, blocks=None):
    """One draw per row from softmax(logits_bv * inv_t): the first id whose cumulative mass exceeds
    u * total, with one uniform u per row (-inf logits have no mass and are never drawn). `blocks` is
    `softmax_blocks` of the same arguments when the caller has it already.

    Gumbel-max (`jax.random.categorical`) needs one random number per vocabulary entry: 293 ms a token
    step at 152K ids and 64 rows on a 2-core CPU (BENCHMARKS.md, "Service")."""
    vocab = logits_bv.shape[-1]
    blocks = softmax_blocks(logits_bv, inv_temperature_b1) if blocks is None else blocks
    logits_bcl, max_b1, block_mass_bc = blocks
    block_cdf_bc = jnp.cumsum(block_mass_bc, axis=-1)
    u_b1 = jax.vmap(lambda key: jax.random.uniform(key, (1,), block_mass_bc.dtype))(keys_b)
    target_b1 = u_b1 * block_cdf_bc[:, -1:]
    # Rounding can point past the last block (or id) with mass: clamp to it.
    below_b = jnp.sum(block_cdf_bc <= target_b1, axis=-1, dtype=jnp.int32)
    block_b = jnp.minimum(below_b, _last_positive(block_mass_bc))
    mass_before_b1 = jnp.take_along_axis(block_cdf_bc - block_mass_bc, block_b[:, None], axis=-1)
    inner_mass_bl = jnp.exp((_block_of_row(logits_bcl, block_b) - max_b1) * inv_temperature_b1)
    inner_cdf_bl = jnp.cumsum(inner_mass_bl, axis=-1)
    inner_b = jnp.sum(inner_cdf_bl <= target_b1 - mass_before_b1, axis=-1, dtype=jnp.int32)
    inner_b = jnp.minimum(inner_b, _last_positive(inner_mass_bl))
    return jnp.minimum(block_b * logits_bcl.shape[2] + inner_b, vocab - 1)
