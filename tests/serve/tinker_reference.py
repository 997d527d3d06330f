"""References for the Tinker service tests: Tinker's published per-token losses in numpy, and logprobs from
the project's model functions on the served weights (`server` holds the loaded `config` and `params`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tinker import types

from polaris_jax.models import logits
from polaris_jax.train.adapters import AdapterSpec, with_adapter

RANK = 4  # the tests' LoRA rank (an adapter passed here has this rank and every target)


def datum(seq, **inputs):
    inputs = {k: np.asarray(v, np.float32) for k, v in inputs.items()}
    return types.Datum(
        model_input=types.ModelInput.from_ints(seq[:-1]), loss_fn_inputs={"target_tokens": seq[1:], **inputs}
    )


def jax_logprobs(server, seq, adapter=None):
    """Per-token logprobs of seq[1:] given seq[:-1], from the project's model functions (traceable in the
    adapter, for reference gradients)."""
    config, params = server["config"], server["params"]
    if adapter is not None:
        config, params = AdapterSpec(rank=RANK, train_unembed=True).model_config(config), with_adapter(params, adapter)
    logp = jax.nn.log_softmax(logits(config, params, jnp.asarray([seq[:-1]]))[0], axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(seq[1:])[:, None], axis=-1)[:, 0]


def model_logprobs(server, seq, adapter=None) -> np.ndarray:
    return np.asarray(jax_logprobs(server, seq, adapter))


def reference_loss(name, lp, inputs, config):
    """Tinker's documented per-token losses (tinker-docs losses/*), summed."""
    q, adv = inputs.get("logprobs"), inputs.get("advantages")
    if name == "cross_entropy":
        return float(np.sum(-lp * inputs["weights"]))
    ratio = np.exp(lp - q) if q is not None else None
    lo, hi = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    if name == "importance_sampling":
        return float(np.sum(-ratio * adv))
    if name == "ppo":
        return float(np.sum(-np.minimum(ratio * adv, np.clip(ratio, lo, hi) * adv)))
    if name == "cispo":
        return float(np.sum(-np.clip(ratio, lo, hi) * lp * adv))
    assert name == "dro"
    return float(np.sum(-(lp * adv - 0.5 * config.get("beta", 0.05) * (lp - q) ** 2)))
