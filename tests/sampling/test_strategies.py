"""Sampling strategies against analytic distributions (numpy references, chi-square tests)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.sampling import SamplingSettings, sample
from polaris_jax.sampling.strategies import TRUNCATIONS, first_argmax

LOGITS_V = np.array([2.0, 1.5, 1.2, 0.4, 0.0, -0.3, -1.0, -2.5], np.float32)
DRAWS = 60_000


def _analytic(logits_v, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """Textbook definitions, in float64: top-k keeps the k largest; top-p keeps the smallest most-probable
    prefix whose mass reaches p; min-p keeps tokens with prob >= min_p * max prob; then renormalise."""
    scaled = logits_v.astype(np.float64) / temperature
    keep = np.ones_like(scaled, bool)
    if top_k:
        keep &= scaled >= np.sort(scaled)[::-1][top_k - 1]
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        mass_before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
        kept = np.zeros_like(keep)
        kept[order[mass_before < top_p]] = True
        probs = np.where(kept, probs, 0.0) / probs[kept].sum()
    if min_p > 0.0:
        probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


def _chi2_critical(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at upper tail ~1e-6 (z = 4.75)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _draw(settings: SamplingSettings, seed: int = 0) -> np.ndarray:
    logits_bv = jnp.broadcast_to(jnp.asarray(LOGITS_V), (DRAWS, LOGITS_V.size))
    keys_b = jax.random.split(jax.random.key(seed), DRAWS)
    tokens_b, _ = jax.jit(sample)(logits_bv, keys_b, settings)
    return np.asarray(tokens_b)


CASES = {
    "temperature": dict(temperature=0.7),
    "hot": dict(temperature=1.8),
    "top_k": dict(temperature=1.0, top_k=3),
    "top_p": dict(temperature=1.0, top_p=0.8),
    "min_p": dict(temperature=1.3, min_p=0.2),
    "top_k_top_p": dict(temperature=0.9, top_k=5, top_p=0.9),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_empirical_frequencies_match_analytic(case):
    kwargs = CASES[case]
    expected_v = _analytic(LOGITS_V, **kwargs)
    counts_v = np.bincount(_draw(SamplingSettings.create(**kwargs)), minlength=LOGITS_V.size)
    assert counts_v[expected_v == 0].sum() == 0, f"{case}: drew truncated tokens {counts_v}"
    support = expected_v > 0
    chi2 = float(np.sum((counts_v[support] - DRAWS * expected_v[support]) ** 2 / (DRAWS * expected_v[support])))
    assert chi2 < _chi2_critical(int(support.sum()) - 1), f"{case}: chi2={chi2:.1f}, counts={counts_v}"
    tv = 0.5 * np.abs(counts_v / DRAWS - expected_v).sum()
    assert tv < 0.01, f"{case}: total variation {tv:.4f}"


def test_truncation_is_a_real_test():
    """The chi-square check rejects a distribution that keeps one token too many."""
    near_v = _analytic(LOGITS_V, top_p=0.8)
    wrong_v = _analytic(LOGITS_V, top_k=int((near_v > 0).sum()) + 1)
    counts_v = np.bincount(_draw(SamplingSettings.create(top_p=0.8)), minlength=LOGITS_V.size)
    support = wrong_v > 0
    chi2 = float(np.sum((counts_v[support] - DRAWS * wrong_v[support]) ** 2 / (DRAWS * wrong_v[support])))
    assert chi2 > _chi2_critical(int(support.sum()) - 1)


def test_greedy_is_argmax_and_logprob_is_unscaled():
    logits_bv = jnp.asarray(np.random.RandomState(0).randn(5, 11).astype(np.float32))
    settings = SamplingSettings.create(temperature=0.0)
    tokens_b, logprobs_b = sample(logits_bv, jax.random.split(jax.random.key(0), 5), settings)
    np.testing.assert_array_equal(tokens_b, np.argmax(logits_bv, -1))
    np.testing.assert_allclose(logprobs_b, np.max(jax.nn.log_softmax(logits_bv), -1), atol=1e-6)


def test_first_argmax_matches_numpy_on_ties_and_inf():
    rng = np.random.RandomState(3)
    x_bv = rng.randint(-3, 4, size=(64, 37)).astype(np.float32)  # many ties
    x_bv[0] = -np.inf
    x_bv[1, 5] = np.inf
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x_bv)), np.argmax(x_bv, -1))


def test_categorical_draws_follow_the_tempered_softmax():
    """20,000 draws of one row: each id's frequency is within 4.5 standard errors of softmax(logits / T),
    and a draw never lands on an id the truncation dropped."""
    logits_v = np.random.RandomState(4).randn(50).astype(np.float32)
    draws = 20_000
    logits_bv = jnp.asarray(np.tile(logits_v, (draws, 1)))
    keys_b = jax.random.split(jax.random.key(7), draws)
    tokens_b, _ = jax.jit(sample)(logits_bv, keys_b, SamplingSettings.create(temperature=0.7))
    p_v = np.asarray(jax.nn.softmax(jnp.asarray(logits_v) / 0.7))
    freq_v = np.bincount(np.asarray(tokens_b), minlength=50) / draws
    assert np.all(np.abs(freq_v - p_v) <= 4.5 * np.sqrt(p_v * (1 - p_v) / draws) + 1e-4)
    top_b, _ = jax.jit(sample)(logits_bv, keys_b, SamplingSettings.create(temperature=0.7, top_k=3))
    assert set(np.unique(np.asarray(top_b))) == set(np.argsort(-logits_v)[:3])


def test_logprob_is_before_truncation():
    settings = SamplingSettings.create(temperature=0.5, top_k=2)
    logits_bv = jnp.asarray(np.tile(LOGITS_V, (4, 1)))
    tokens_b, logprobs_b = sample(logits_bv, jax.random.split(jax.random.key(1), 4), settings)
    full_v = jax.nn.log_softmax(jnp.asarray(LOGITS_V) / 0.5)
    np.testing.assert_allclose(logprobs_b, full_v[tokens_b], atol=1e-6)


def test_top_k_keeps_ties_and_registry_names():
    assert set(TRUNCATIONS) >= {"top_k", "top_p", "min_p"}
    settings = SamplingSettings.create(top_k=2)
    out = TRUNCATIONS["top_k"](jnp.asarray([[3.0, 1.0, 3.0, 3.0, 0.0]]), settings)
    np.testing.assert_array_equal(np.isfinite(out[0]), [True, False, True, True, False])


def test_settings_pick_truncations():
    assert SamplingSettings.create(temperature=0.0, top_k=5).truncations == ()
    assert SamplingSettings.create(top_k=5, top_p=0.9, min_p=0.1).truncations == ("top_k", "top_p", "min_p")
    assert SamplingSettings.create(top_k=300, vocab_size=256).top_k == 0  # whole vocabulary: no truncation
