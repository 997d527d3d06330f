"""Many-adapter LoRA training (`train/adapters.py`) and Tinker's token losses (`train/token_losses.py`),
in process on tiny dense and MoE models. The service's end-to-end checks are in tests/serve/test_tinker.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polaris_jax.models import ModelConfig, init_params, logits
from polaris_jax.train import adapters
from polaris_jax.train.token_losses import TOKEN_LOSSES, loss_config


def _rows(rng, lengths, vocab):
    return [
        {
            "tokens": rng.randint(0, vocab, n),
            "target_tokens": rng.randint(0, vocab, n),
            "weights": rng.rand(n).astype(np.float32),
            "logprobs": -rng.rand(n).astype(np.float32),
            "advantages": rng.randn(n).astype(np.float32),
        }
        for n in lengths
    ]


def _numpy_loss(name, lp, row, cfg):
    """Tinker's published per-token formulas (tinker-docs losses/*), in numpy."""
    q, adv = row["logprobs"], row["advantages"]
    ratio = np.exp(lp - q)
    if name == "cross_entropy":
        return np.sum(-lp * row["weights"])
    if name == "importance_sampling":
        return np.sum(-ratio * adv)
    clipped = np.clip(ratio, cfg.get("clip_low_threshold"), cfg.get("clip_high_threshold"))
    if name == "ppo":
        return np.sum(-np.minimum(ratio * adv, clipped * adv))
    if name == "cispo":
        return np.sum(-clipped * lp * adv)
    return np.sum(-(lp * adv - 0.5 * cfg["beta"] * (lp - q) ** 2))


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_losses_and_logprobs_match_the_model_and_the_formulas(arch):
    config = ModelConfig.tiny(arch)
    base = init_params(config, jax.random.key(0))
    spec = adapters.AdapterSpec(rank=4, seed=1)
    adapter = adapters.init_adapter(config, spec)
    rng = np.random.RandomState(0)
    rows = _rows(rng, (5, 9), config.vocab_size)
    for name, given in [("cross_entropy", {}), ("ppo", {"clip_low_threshold": 0.9}), ("dro", {"beta": 0.2})]:
        cfg = loss_config(name, given)
        batch = adapters.pad_batch(rows, ("weights", "logprobs", "advantages"), {})
        out = adapters.forward(spec.model_config(config), name, base, adapter, batch, cfg)
        expected = 0.0
        for i, row in enumerate(rows):
            logp = jax.nn.log_softmax(logits(config, base, jnp.asarray([row["tokens"]]))[0], -1)
            lp = np.asarray(jnp.take_along_axis(logp, jnp.asarray(row["target_tokens"])[:, None], -1)[:, 0])
            np.testing.assert_allclose(np.asarray(out["logprobs_bt"])[i, : len(lp)], lp, atol=1e-5)
            expected += _numpy_loss(name, lp, row, cfg)
        assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)


def test_moe_expert_adapters_get_gradients():
    config = ModelConfig.tiny("qwen3_moe")
    base = init_params(config, jax.random.key(0))
    spec = adapters.AdapterSpec(rank=2, seed=0)
    adapter = adapters.init_adapter(config, spec)
    expert_leaves = {k: v.shape for k, v in adapter["moe_layers"].items() if k.startswith(("gate", "up", "down"))}
    # Tinker's layout: the hidden-size factor is shared by every expert, the other is per expert.
    layers, d, e, f, r = config.num_layers, config.hidden_size, config.num_experts, config.moe_intermediate_size, 2
    assert expert_leaves == {
        "gate_lora_a": (layers, d, r),
        "up_lora_a": (layers, d, r),
        "gate_lora_b": (layers, e, r, f),
        "up_lora_b": (layers, e, r, f),
        "down_lora_a": (layers, e, f, r),
        "down_lora_b": (layers, r, d),
    }
    batch = adapters.pad_batch(_rows(np.random.RandomState(1), (7,), config.vocab_size), ("weights",), {})
    out = adapters.forward_backward(spec.model_config(config), "cross_entropy", base, adapter, batch, {})
    grads = out["grads"]["moe_layers"]
    assert float(jnp.abs(grads["up_lora_b"]).max()) > 0  # B starts at zero; its gradient must not
    assert float(jnp.abs(grads["down_lora_b"]).max()) > 0  # the shared factor too
    assert float(jnp.abs(grads["q_lora_b"]).max()) > 0


def test_adam_step_equals_optax_adamw_with_clipping():
    config = ModelConfig.tiny()
    adapter = adapters.init_adapter(config, adapters.AdapterSpec(rank=3, seed=2))
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3) * jnp.arange(x.size).reshape(x.shape) / x.size, adapter)
    given = {
        "learning_rate": 3e-3,
        "beta1": 0.85,
        "beta2": 0.97,
        "eps": 1e-6,
        "weight_decay": 0.05,
        "grad_clip_norm": 0.5,
    }
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(3e-3, b1=0.85, b2=0.97, eps=1e-6, weight_decay=0.05))
    expected, state = adapter, tx.init(adapter)
    got, opt_state = jax.tree.map(jnp.copy, adapter), adapters.init_opt_state(adapter)
    for _ in range(3):
        updates, state = tx.update(grads, state, expected)
        expected = optax.apply_updates(expected, updates)
        got, opt_state, norm = adapters.adam_step(got, opt_state, grads, adapters.adam_hyper(given))
    assert float(norm) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="rank"):
        adapters.AdapterSpec(rank=0).check()
    with pytest.raises(ValueError, match="train_attn, train_mlp"):
        adapters.AdapterSpec(train_attn=False, train_mlp=False).check()
    with pytest.raises(ValueError, match="adam_params.learning_rate"):
        adapters.adam_hyper({"learning_rate": -1.0})
    with pytest.raises(ValueError, match="adam_params.beta2"):
        adapters.adam_hyper({"beta2": 1.0})
    with pytest.raises(ValueError, match="unknown loss"):
        loss_config("nope", {})
    with pytest.raises(ValueError, match="loss_fn_config"):
        loss_config("dro", {"clip_low_threshold": 0.5})
    assert set(TOKEN_LOSSES) == {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro"}


@pytest.mark.parametrize("tied", [False, True])
def test_unembed_lora_applies_and_merges(tied):
    from polaris_jax.models import merge_lora

    config = ModelConfig.tiny(tie_word_embeddings=tied)
    base = init_params(config, jax.random.key(0))
    spec = adapters.AdapterSpec(rank=2, seed=3, train_unembed=True)
    adapter = adapters.init_adapter(config, spec)
    adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter)  # B != 0
    assert adapter["lm_head_lora_b"].shape == (2, config.vocab_size)
    lora_config, params = spec.model_config(config), adapters.with_adapter(base, adapter)
    tokens = jnp.asarray([[3, 14, 15, 92, 65]])
    unmerged = logits(lora_config, params, tokens)
    merged_config, merged = merge_lora(lora_config, params)
    assert not merged_config.tie_word_embeddings and "lm_head" in merged
    np.testing.assert_allclose(logits(merged_config, merged, tokens), unmerged, atol=2e-4)
    no_unembed = {**adapter, "lm_head_lora_b": jnp.zeros_like(adapter["lm_head_lora_b"])}
    without = logits(lora_config, adapters.with_adapter(base, no_unembed), tokens)
    assert float(jnp.abs(unmerged - without).max()) > 1e-3  # the unembedding adapter changes the logits


@pytest.mark.slow  # ~20 s of compiles; the SDK test of coinciding clients covers the same path in make test
def test_stacked_adapters_train_each_on_its_own_rows():
    """Multi-LoRA forward_backward: two adapters (ranks 8 and 4, other targets and alphas, one on the
    unembedding) in one call give each row its own adapter's loss and logprobs and each adapter the gradient
    of its rows alone, as separate calls do."""
    from tests.models.test_multi_lora import SPECS, random_adapter

    specs = SPECS[1:]

    config = ModelConfig.tiny()
    base = init_params(config, jax.random.key(0))
    trained = [random_adapter(config, spec) for spec in specs]
    rng = np.random.RandomState(4)
    rows = _rows(rng, (6, 9, 4, 7, 5), config.vocab_size)
    owner = [1, 0, 1, 1, 0]
    keys, name, cfg = ("logprobs", "advantages"), "ppo", loss_config("ppo", {"clip_low_threshold": 0.7})
    batch = adapters.pad_batch(rows, keys, {})
    batch["adapter_rows_b"] = np.zeros(len(batch["tokens_bt"]), np.int32)
    batch["adapter_rows_b"][: len(rows)] = owner
    out = adapters.forward_backward(config, name, base, tuple(trained), batch, cfg, adapters.Stack.of(specs))
    for k, (spec, adapter) in enumerate(zip(specs, trained)):
        mine = [i for i, o in enumerate(owner) if o == k]
        alone = adapters.forward_backward(
            spec.model_config(config), name, base, adapter, adapters.pad_batch([rows[i] for i in mine], keys, {}), cfg
        )
        np.testing.assert_allclose(np.asarray(out["loss_b"])[mine], np.asarray(alone["loss_b"])[: len(mine)], rtol=2e-5)
        np.testing.assert_allclose(
            np.asarray(out["logprobs_bt"])[mine], np.asarray(alone["logprobs_bt"])[: len(mine)], atol=2e-5
        )
        assert jax.tree.structure(out["grads"][k]) == jax.tree.structure(alone["grads"])
        for got, want in zip(jax.tree.leaves(out["grads"][k]), jax.tree.leaves(alone["grads"])):
            assert float(jnp.abs(want).max()) > 0
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
