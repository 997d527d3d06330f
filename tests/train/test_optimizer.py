"""bf16 params with a float32 master copy in the optimiser state (`optimizer.master_weights`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polaris_jax.models import ConfigError, ModelConfig
from polaris_jax.train.optimizer import MasterWeightsState, make_optimizer, optimizer_from_config, with_master_weights
from polaris_jax.train.sft.config import default_config


def _params(dtype):
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(8, 16)), dtype), "b": jnp.asarray(rng.normal(size=(16,)), dtype)}


def _grads(step, dtype):
    rng = np.random.default_rng(100 + step)
    return {"w": jnp.asarray(rng.normal(size=(8, 16)), dtype), "b": jnp.asarray(rng.normal(size=(16,)), dtype)}


def test_master_copy_follows_plain_adamw_in_float32_and_params_are_it_rounded():
    """The master takes exactly optax's AdamW trajectory on float32 params fed the same gradients; the bf16
    params are the master rounded to bf16 after every step (no drift between the two)."""
    adamw = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))  # noqa: E731
    ours, reference = with_master_weights(adamw()), adamw()
    params = _params(jnp.bfloat16)
    ref_params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    state, ref_state = ours.init(params), reference.init(ref_params)
    assert isinstance(state, MasterWeightsState)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    for step in range(5):
        grads = _grads(step, jnp.bfloat16)
        updates, state = ours.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ref_updates, ref_state = reference.update(
            jax.tree.map(lambda g: g.astype(jnp.float32), grads), ref_state, ref_params
        )
        ref_params = optax.apply_updates(ref_params, ref_updates)
        for name in params:
            assert params[name].dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(state.master[name]), np.asarray(ref_params[name]))
            np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(state.master[name].astype(jnp.bfloat16)))


def test_updates_below_bf16_resolution_accumulate_in_the_master():
    """Plain bf16 AdamW rounds a 1e-4 step on weights of size ~1 away (bf16 spacing there is 2^-7), so the
    params never move; with master weights the steps accumulate and the bf16 params move."""
    params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
    grads = {"w": jnp.ones((4, 4), jnp.bfloat16)}
    moved = {}
    for master in (False, True):
        tx, _ = make_optimizer(
            peak_lr=1e-4, total_steps=100, min_lr_ratio=1.0, grad_clip_norm=None, master_weights=master
        )
        p, state = params, tx.init(params)
        for _ in range(100):
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        moved[master] = float(jnp.max(jnp.abs(p["w"].astype(jnp.float32) - 1.0)))
    assert moved[False] == 0.0
    assert moved[True] > 0.005  # 100 Adam steps of 1e-4 = 0.01, rounded to bf16 near 1


def test_master_weights_need_low_precision_params():
    section = default_config().optimizer
    section.master_weights = True
    with pytest.raises(ConfigError, match="model.param_dtype='float32'"):
        optimizer_from_config(section, 10, param_dtype="float32")
    tx, _ = optimizer_from_config(section, 10, param_dtype="bfloat16")
    assert isinstance(tx.init(_params(jnp.bfloat16)), MasterWeightsState)


@pytest.mark.slow  # ~22 s (three SFT runs): make test-slow
def test_sft_step_with_bf16_params_and_master_tracks_float32_params():
    """Three SFT steps with bf16 params + float32 master against float32 params (bf16 matmuls in both): the
    losses agree and the master moves as the float32 params do, while bf16 params without a master round
    most of those small steps away."""
    from tests.train.sft.test_sft_step import _setup
    from tests.train.sft_helpers import random_packed_batch

    config = ModelConfig.tiny(vocab_size=64, compute_dtype="bfloat16")
    batch = random_packed_batch(0, batch=4, length=32, vocab=64)
    moves, losses = {}, {}
    for name, dtype, master in (("fp32", "float32", False), ("master", "bfloat16", True), ("bf16", "bfloat16", False)):
        _, state, step, _ = _setup(config.replace(param_dtype=dtype), peak_lr=1e-4, master_weights=master)
        start = jax.device_get(state["params"])
        losses[name] = []
        for i in range(3):
            state, metrics = step(state, batch, jax.random.PRNGKey(i))
            losses[name].append(float(metrics["loss"]))
        state = jax.device_get(state)
        end = state["opt_state"].master if master else state["params"]
        moves[name] = [
            np.asarray(b, np.float32) - np.asarray(a, np.float32)
            for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(end), strict=True)
        ]
        if master:
            assert jax.tree.leaves(state["params"])[0].dtype == jnp.bfloat16
            for p, m in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(end), strict=True):
                np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
    np.testing.assert_allclose(losses["master"], losses["fp32"], rtol=2e-3)
    err = lambda name: np.mean(  # noqa: E731
        np.concatenate([np.abs(a - b).ravel() for a, b in zip(moves[name], moves["fp32"], strict=True)])
    )
    assert err("bf16") > 5 * err("master")
