"""The sampler's two-level vocabulary reductions against their flat numpy definitions, on vocabularies that
split into several blocks, with and without a padded tail."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.sampling import vocab_blocks
from polaris_jax.sampling.vocab_blocks import block_length, first_argmax, inverse_cdf_draw, vocab_view

from .test_strategies import _chi2_critical

# 96: 3 blocks of 32 (a free reshape). 1031 is prime: one block of the whole row, or (as a prime
# vocabulary over 8192 ids would get) 17 blocks of 64 with the last one padded.
VOCABS = (96, 1031, "1031-padded")


@pytest.fixture
def vocab(request, monkeypatch):
    if request.param == "1031-padded":
        monkeypatch.setattr(vocab_blocks, "_BLOCK_RANGE", (32, 64))
        monkeypatch.setattr(vocab_blocks, "_PAD_BLOCK", 64)
        assert vocab_view(jnp.zeros((2, 1031)), -jnp.inf).shape == (2, 17, 64)
        return 1031
    return request.param


def test_block_length_divides_the_vocabulary_when_it_can():
    for vocab in (151_669, 151_936, 32_000, 96):
        length = block_length(vocab)
        assert vocab % length == 0 and 32 <= length <= 8192, (vocab, length)
    assert block_length(151_669) in (329, 461)  # 7 x 47 x 461: the divisors nearest sqrt(V) = 389
    assert block_length(1031) == 1031 and block_length(8209) == 512  # primes: one block, else padded
    assert vocab_view(jnp.zeros((2, 8209)), -jnp.inf).shape == (2, 17, 512)


@pytest.mark.parametrize("vocab", VOCABS, indirect=True)
def test_first_argmax_is_numpys_first_maximum(vocab):
    rng = np.random.RandomState(vocab)
    x_bv = rng.randint(-3, 4, size=(64, vocab)).astype(np.float32)  # ties within and across blocks
    x_bv[0] = -np.inf
    x_bv[1, 5] = np.inf
    x_bv[2, :] = -1.0
    x_bv[2, [40, vocab - 1]] = 7.0  # the maximum first in the second block, tied in the last
    x_bv[3, vocab - 1] = 9.0  # the last id, in the padded block where there is one
    got_b = np.asarray(jax.jit(first_argmax)(jnp.asarray(x_bv)))
    np.testing.assert_array_equal(got_b, np.argmax(x_bv, -1))
    nan_bv = np.full((1, vocab), np.nan, np.float32)
    assert int(first_argmax(jnp.asarray(nan_bv))[0]) == vocab - 1


@pytest.mark.parametrize("vocab", VOCABS, indirect=True)
def test_inverse_cdf_draws_follow_the_tempered_softmax_across_blocks(vocab):
    """60,000 draws of one row: a chi-square test against softmax(logits / 0.8) in float64, over logits with
    a whole block and the last ids at -inf (never drawn)."""
    draws, temperature = 60_000, 0.8
    logits_v = np.random.RandomState(1).randn(vocab).astype(np.float32) * 0.6
    logits_v[32:64] = -np.inf
    logits_v[-7:] = -np.inf
    scaled_v = logits_v.astype(np.float64) / temperature
    expected_v = np.exp(scaled_v - scaled_v.max())
    expected_v /= expected_v.sum()
    logits_bv = jnp.broadcast_to(jnp.asarray(logits_v), (draws, vocab))
    keys_b = jax.random.split(jax.random.key(vocab), draws)
    inv_temperature_b1 = jnp.full((draws, 1), 1.0 / temperature, jnp.float32)
    tokens_b = np.asarray(jax.jit(inverse_cdf_draw)(logits_bv, keys_b, inv_temperature_b1))
    counts_v = np.bincount(tokens_b, minlength=vocab)
    assert counts_v.size == vocab and counts_v[expected_v == 0].sum() == 0
    support = expected_v > 0
    chi2 = float(np.sum((counts_v[support] - draws * expected_v[support]) ** 2 / (draws * expected_v[support])))
    assert chi2 < _chi2_critical(int(support.sum()) - 1), f"chi2={chi2:.1f} over {support.sum()} ids"
    # The test can fail: the same draws judged against the untempered softmax are rejected.
    wrong_v = np.exp(logits_v.astype(np.float64) - logits_v.max())
    wrong_v /= wrong_v.sum()
    wrong_chi2 = float(np.sum((counts_v[support] - draws * wrong_v[support]) ** 2 / (draws * wrong_v[support])))
    assert wrong_chi2 > _chi2_critical(int(support.sum()) - 1)
