"""Sampling strategies: greedy, temperature, and the top-k / top-p / min-p truncations, by name.

A strategy is a small function `(logits_bv, keys_b, settings) -> tokens_b`. Truncations are the
pluggable part: each one is `(scaled_logits_bv, settings) -> scaled_logits_bv` with dropped tokens set
to -inf, registered by name in `TRUNCATIONS` and applied in the order of `settings.truncations`
(top-k, then top-p, then min-p, as transformers' warpers do). `sample` runs greedy or the
temperature-scaled truncated categorical draw and returns the log-probability of each drawn token
under the temperature-scaled distribution *before* truncation (verl's convention, which GRPO compares
with its own recomputation); for greedy it is the unscaled (temperature 1) distribution.

`SamplingSettings` is a pytree: temperature, top_p and min_p are traced leaves (changing them never
recompiles); top_k and the names of the active truncations are static (they fix shapes and code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from polaris_jax.sampling.vocab_blocks import first_argmax, inverse_cdf_draw, log_softmax_at, softmax_blocks

TRUNCATIONS: dict[str, Callable] = {}
# Application order when several truncations are active.
TRUNCATION_ORDER = ("top_k", "top_p", "min_p")


def register_truncation(name: str):
    """Adds a truncation `(scaled_logits_bv, settings) -> scaled_logits_bv` to the registry."""

    def wrap(fn):
        if name in TRUNCATIONS:
            raise ValueError(f"truncation {name!r} is already registered")
        TRUNCATIONS[name] = fn
        return fn

    return wrap


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """What `sample` draws from; build with `SamplingSettings.create` (validates, picks truncations)."""

    temperature: float | jax.Array = 1.0
    top_p: float | jax.Array = 1.0
    min_p: float | jax.Array = 0.0
    top_k: int = dataclasses.field(default=0, metadata=dict(static=True))
    greedy: bool = dataclasses.field(default=False, metadata=dict(static=True))
    truncations: tuple[str, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    @classmethod
    def create(
        cls,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        vocab_size: int | None = None,
    ) -> SamplingSettings:
        if not temperature >= 0.0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if not 0.0 <= min_p < 1.0:
            raise ValueError(f"min_p={min_p} must be in [0, 1)")
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k={top_k} must be a non-negative integer (0 disables it)")
        if vocab_size is not None and top_k >= vocab_size:
            top_k = 0  # keeping the whole vocabulary is no truncation
        active = {"top_k": top_k > 0, "top_p": top_p < 1.0, "min_p": min_p > 0.0}
        greedy = temperature == 0.0
        return cls(
            temperature=float(temperature),
            top_p=float(top_p),
            min_p=float(min_p),
            top_k=int(top_k),
            greedy=greedy,
            truncations=() if greedy else tuple(n for n in TRUNCATION_ORDER if active[n]),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSettings:
    """Per-row sampling settings for a batch whose rows belong to different requests (the engine's decode
    batch). Every field is a [B, 1] array; temperature 0 is greedy, top_k 0, top_p 1 and min_p 0 are off.
    The truncations are the registry's, applied in TRUNCATION_ORDER, each a no-op on rows that turn it off."""

    temperature: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    top_k: jax.Array
    truncations = TRUNCATION_ORDER

    @classmethod
    def stack(cls, settings: list[SamplingSettings], rows: int) -> RowSettings:
        """Host arrays for `rows` rows: row i has settings[i]; padding rows are greedy."""
        fields = dict(temperature=0.0, top_p=1.0, min_p=0.0, top_k=0)
        out = {
            name: np.full((rows, 1), value, np.int32 if name == "top_k" else np.float32)
            for name, value in fields.items()
        }
        for i, s in enumerate(settings):
            for name in fields:
                out[name][i, 0] = getattr(s, name)
        return cls(**out)


def _sorted_descending(logits_bv):
    return -jnp.sort(-logits_bv, axis=-1)


@register_truncation("top_k")
def top_k(logits_bv, settings):
    """Keeps the k largest logits (ties with the k-th are kept too, as transformers does)."""
    if isinstance(settings.top_k, int):
        kth_b1 = jax.lax.top_k(logits_bv, settings.top_k)[0][:, -1:]
    else:  # per-row k (RowSettings): the k-th of the sorted row; k = 0 keeps everything
        sorted_bv = _sorted_descending(logits_bv)
        kth_b1 = jnp.take_along_axis(sorted_bv, jnp.maximum(settings.top_k - 1, 0), axis=-1)
        kth_b1 = jnp.where(settings.top_k > 0, kth_b1, -jnp.inf)
    return jnp.where(logits_bv >= kth_b1, logits_bv, -jnp.inf)


@register_truncation("top_p")
def top_p(logits_bv, settings):
    """Nucleus: keeps the smallest most-probable set whose probability reaches top_p."""
    if isinstance(settings.top_k, int) and settings.top_k:  # only k candidates are finite: sort those
        sorted_bk = jax.lax.top_k(logits_bv, settings.top_k)[0]
    else:
        sorted_bk = _sorted_descending(logits_bv)
    probs_bk = jnp.exp(sorted_bk - jax.nn.logsumexp(logits_bv, axis=-1, keepdims=True))
    mass_before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk
    kept_bk = mass_before_bk < settings.top_p  # the first token is always kept
    threshold_b1 = jnp.min(jnp.where(kept_bk, sorted_bk, jnp.inf), axis=-1, keepdims=True)
    threshold_b1 = jnp.where(settings.top_p < 1.0, threshold_b1, -jnp.inf)  # top_p 1 keeps everything
    return jnp.where(logits_bv >= threshold_b1, logits_bv, -jnp.inf)


@register_truncation("min_p")
def min_p(logits_bv, settings):
    """Keeps tokens whose probability is at least min_p times the most likely token's."""
    threshold_b1 = jnp.max(logits_bv, axis=-1, keepdims=True) + jnp.log(settings.min_p)
    threshold_b1 = jnp.where(settings.min_p > 0.0, threshold_b1, -jnp.inf)
    return jnp.where(logits_bv >= threshold_b1, logits_bv, -jnp.inf)


def truncate(scaled_logits_bv, settings: SamplingSettings):
    for name in settings.truncations:
        if name not in TRUNCATIONS:
            raise KeyError(f"unknown truncation {name!r}; registered: {sorted(TRUNCATIONS)}")
        scaled_logits_bv = TRUNCATIONS[name](scaled_logits_bv, settings)
    return scaled_logits_bv


def greedy(logits_bv, keys_b, settings: SamplingSettings):
    del keys_b, settings
    return first_argmax(logits_bv)


def _ones_b1(logits_bv):
    return jnp.ones((logits_bv.shape[0], 1), logits_bv.dtype)


def categorical(logits_bv, keys_b, settings: SamplingSettings):
    """Temperature scaling, the active truncations, then one independent draw per row (inverse CDF)."""
    if not settings.truncations:  # scale inside the draw's exp (shares its pass with the logprob's)
        return inverse_cdf_draw(logits_bv, keys_b, _ones_b1(logits_bv) / settings.temperature)
    truncated_bv = truncate(logits_bv / settings.temperature, settings)
    return inverse_cdf_draw(truncated_bv, keys_b, _ones_b1(logits_bv))


STRATEGIES: dict[str, Callable] = {"greedy": greedy, "categorical": categorical}


def sample(logits_bv, keys_b, settings: SamplingSettings):
    """Returns (tokens_b int32, logprobs_b float32); see the module docstring for the logprob convention."""
    logits_bv = logits_bv.astype(jnp.float32)
    tokens_b = STRATEGIES["greedy" if settings.greedy else "categorical"](logits_bv, keys_b, settings)
    inv_temperature_b1 = _ones_b1(logits_bv) / (1.0 if settings.greedy else settings.temperature)
    blocks = softmax_blocks(logits_bv, inv_temperature_b1)  # the draw's own, merged by XLA (same ops)
    return tokens_b, log_softmax_at(logits_bv, tokens_b, inv_temperature_b1, blocks)


def sample_rows(logits_bv, keys_b, settings: RowSettings):
    """`sample` with each row's own settings (greedy where temperature is 0): a row draws the same token
    and logprob as `sample` with its settings would. The truncations run only when some sampled row
    asks for one and the draw only when some row samples (`lax.cond`)."""
    logits_bv = logits_bv.astype(jnp.float32)
    greedy_b1 = settings.temperature == 0.0
    temperature_b1 = jnp.where(greedy_b1, 1.0, settings.temperature)
    inv_temperature_b1 = 1.0 / temperature_b1
    blocks = softmax_blocks(logits_bv, inv_temperature_b1)
    greedy_b = first_argmax(logits_bv)

    def draw(logits_bv):
        truncating = (settings.top_k > 0) | (settings.top_p < 1.0) | (settings.min_p > 0.0)
        return jax.lax.cond(
            jnp.any(truncating & ~greedy_b1),
            lambda x: inverse_cdf_draw(truncate(x / temperature_b1, settings), keys_b, _ones_b1(x)),
            lambda x: inverse_cdf_draw(x, keys_b, inv_temperature_b1, blocks),
            logits_bv,
        )

    drawn_b = jax.lax.cond(jnp.all(greedy_b1), lambda x: greedy_b, draw, logits_bv)
    tokens_b = jnp.where(greedy_b1[:, 0], greedy_b, drawn_b)
    return tokens_b, log_softmax_at(logits_bv, tokens_b, inv_temperature_b1, blocks)
