"""Tinker's built-in per-token losses, one registry: cross_entropy, importance_sampling, ppo, cispo, dro.

Each loss maps the learner's per-token logprobs [B, T] and the datum's loss inputs [B, T] to a per-token
loss [B, T] whose sum is the loss; padding positions carry zero weights and advantages. The formulas are
the ones Tinker documents (tinker-docs `losses/*`), with the sampler's logprobs under the key
`logprobs` and `q` the sampling policy:

  cross_entropy:        -lp · weights
  importance_sampling:  -exp(lp - q) · A
  ppo:                  -min(r·A, clip(r, low, high)·A),   r = exp(lp - q)
  cispo:                -sg(clip(r, low, high)) · lp · A
  dro:                  -(lp·A - beta/2 · (lp - q)²)

`loss_fn_config` keys: ppo and cispo take clip_low_threshold / clip_high_threshold (ratio bounds,
default 0.8 / 1.2); dro takes beta (default 0.05).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TokenLoss:
    fn: Callable  # (lp_bt, inputs: dict[str, [B, T]], config: dict[str, scalar]) -> loss_bt
    inputs: tuple[str, ...]  # loss_fn_inputs keys it needs besides target_tokens
    config: dict  # loss_fn_config keys it takes, with their defaults
    optional_inputs: dict = dataclasses.field(default_factory=dict)  # key -> fill value when absent


TOKEN_LOSSES: dict[str, TokenLoss] = {}


def register(name: str, inputs: tuple[str, ...], config: dict | None = None, optional_inputs: dict | None = None):
    def wrap(fn):
        TOKEN_LOSSES[name] = TokenLoss(fn, inputs, dict(config or {}), dict(optional_inputs or {}))
        return fn

    return wrap


def _ratio(lp_bt, inputs):
    return jnp.exp(lp_bt - inputs["logprobs"])


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


@register("cross_entropy", (), optional_inputs={"weights": 1.0})
def cross_entropy(lp_bt, inputs, config):
    return -lp_bt * inputs["weights"]


@register("importance_sampling", ("logprobs", "advantages"))
def importance_sampling(lp_bt, inputs, config):
    return -_ratio(lp_bt, inputs) * inputs["advantages"]


@register("ppo", ("logprobs", "advantages"), _CLIP)
def ppo(lp_bt, inputs, config):
    ratio, adv = _ratio(lp_bt, inputs), inputs["advantages"]
    clipped = jnp.clip(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -jnp.minimum(ratio * adv, clipped * adv)


@register("cispo", ("logprobs", "advantages"), _CLIP)
def cispo(lp_bt, inputs, config):
    clipped = jnp.clip(_ratio(lp_bt, inputs), config["clip_low_threshold"], config["clip_high_threshold"])
    return -jax.lax.stop_gradient(clipped) * lp_bt * inputs["advantages"]


@register("dro", ("logprobs", "advantages"), {"beta": 0.05})
def dro(lp_bt, inputs, config):
    return -(lp_bt * inputs["advantages"] - 0.5 * config["beta"] * (lp_bt - inputs["logprobs"]) ** 2)


def loss_config(name: str, given: dict) -> dict[str, float]:
    """The loss's config: its defaults updated by `given`; raises ValueError naming an unknown key."""
    if name not in TOKEN_LOSSES:
        raise ValueError(f"loss_fn: unknown loss {name!r}; built in: {sorted(TOKEN_LOSSES)}")
    defaults = TOKEN_LOSSES[name].config
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"loss_fn_config: {sorted(unknown)} not taken by {name!r} (it takes {sorted(defaults)})")
    return {k: float(given.get(k, v)) for k, v in defaults.items()}
