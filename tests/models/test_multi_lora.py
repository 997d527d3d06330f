"""Multi-LoRA: adapters of different ranks and targets stacked in one model, each row using its own, give
each row the logits of its adapter merged into the base weights (`merge_lora`, W + (alpha/r)·A@B)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import ModelConfig, forward, init_params, layers, param_shapes
from polaris_jax.models.lora import merge_lora, stack_adapters
from polaris_jax.train import adapters

ALL_TARGETS = adapters.AdapterSpec(train_unembed=True).targets
SPECS = (
    adapters.AdapterSpec(rank=2, seed=1, train_mlp=False),
    adapters.AdapterSpec(rank=8, seed=2, train_attn=False, alpha=16.0),
    adapters.AdapterSpec(rank=4, seed=3, train_unembed=True),
)


def random_adapter(config, spec) -> dict:
    """A trained-looking adapter for `spec` (numpy draws: eager jax.random compiles once per shape). B is
    drawn too: a fresh adapter's B is zero and changes nothing."""
    rng = np.random.RandomState(spec.seed)
    draw = lambda name, shape: jnp.asarray(rng.randn(*shape).astype(np.float32) * (0.3 if "lora_b" in name else 0.1))
    adapter = {}
    for group, leaf in param_shapes(spec.model_config(config)).items():
        if isinstance(leaf, dict):
            lora = {name: draw(name, s.shape) for name, s in leaf.items() if "_lora_" in name}
            if lora:
                adapter[group] = lora
        elif "_lora_" in group:
            adapter[group] = draw(group, leaf.shape)
    return adapter


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, tokens_bt, adapter_rows_b=None):
    positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    return forward(config, params, tokens_bt, positions_bt, adapter_rows_b=adapter_rows_b)[0]


@pytest.mark.parametrize(
    "tokens, gathered_b_limit",
    [(7, None), (6, 0), (1, None)],  # factors gathered per row; the B side by one-hot; decoding (one token a row)
    ids=["gathered", "one_hot_b", "one_token"],
)
def test_each_row_gets_its_own_adapters_merged_logits(tokens, gathered_b_limit, monkeypatch):
    if gathered_b_limit is not None:  # each case has its own shape, so no case reuses another's trace
        monkeypatch.setattr(layers, "_GATHERED_B_LIMIT", gathered_b_limit)
    config = ModelConfig.tiny("qwen3")
    base = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    tokens_bt = jax.random.randint(jax.random.key(1), (5, tokens), 0, config.vocab_size)
    slots, expected = [None], [_logits(config, base, tokens_bt)]  # slot 0: the base model
    for spec in SPECS:
        adapter = random_adapter(config, spec)
        slots.append((spec.alpha / spec.rank, adapter))
        merged_config, merged = merge_lora(spec.model_config(config), adapters.with_adapter(base, adapter))
        expected.append(_logits(merged_config, merged, tokens_bt))
    stacked = stack_adapters(config, slots, rank=8, targets=ALL_TARGETS)
    params = adapters.with_adapter(base, stacked)
    rows_b = jnp.array([2, 0, 3, 1, 3], jnp.int32)
    got = _logits(config, params, tokens_bt, rows_b)
    for b, slot in enumerate(np.asarray(rows_b)):
        np.testing.assert_allclose(got[b], expected[slot][b], atol=1e-4, rtol=1e-4, err_msg=f"row {b}")
    # The adapters differ enough that a row given another's slot is far off.
    assert float(jnp.max(jnp.abs(expected[2][0] - expected[3][0]))) > 0.1


def test_expert_adapters_and_misfit_leaves_are_refused():
    moe = ModelConfig.tiny("qwen3_moe")
    with pytest.raises(ValueError, match="MoE expert adapters"):
        stack_adapters(moe, [None], rank=4, targets=ALL_TARGETS)
    assert stack_adapters(moe, [None], rank=4, targets=("q", "k", "v", "o"))  # attention is fine
    config = ModelConfig.tiny("qwen3")
    big = random_adapter(config, adapters.AdapterSpec(rank=8))
    misfit = r"dense_layers\.\w+_lora_a: shape \(2, \d+, 8\) does not fit the stack.s \(2, \d+, 4\)"
    with pytest.raises(ValueError, match=misfit):
        stack_adapters(config, [(4.0, big)], rank=4, targets=ALL_TARGETS)
