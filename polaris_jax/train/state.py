"""The train state as a plain pytree, split into a trainable and a frozen part.

  state = {"params": trainable, "frozen": frozen, "opt_state": ..., "step": int32, "rng": key}

Full fine-tuning keeps everything trainable (frozen is empty); LoRA keeps only the adapters
trainable, so the optimiser state covers adapters only. Both parts have the full tree structure
with None where a leaf belongs to the other part.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _is_none(x) -> bool:
    return x is None


def partition(params, trainable_mask):
    """(trainable, frozen): two trees with None in place of the other part's leaves."""
    trainable = jax.tree.map(lambda p, m: p if m else None, params, trainable_mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, trainable_mask)
    return trainable, frozen


def combine(trainable, frozen):
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=_is_none)


def init_state(params, optimizer, rng, trainable_mask=None) -> dict:
    if trainable_mask is None:
        trainable_mask = jax.tree.map(lambda _: True, params)
    trainable, frozen = partition(params, trainable_mask)
    return {
        "params": trainable,
        "frozen": frozen,
        "opt_state": optimizer.init(trainable),
        "step": jnp.zeros((), jnp.int32),
        "rng": rng,
    }


def full_params(state):
    return combine(state["params"], state["frozen"])


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
