"""Blockwise attention against the dense path (itself checked against transformers' goldens).

Values and gradients must agree on packed rows with padding, uneven block splits and GQA, in training
and in prefill over a cache; the compiled backward must not hold [T, T] scores.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import ModelConfig, forward, init_cache, init_params
from polaris_jax.models import attention as attn_lib
from polaris_jax.models.flash_attention import flash_attention

B, T, N, K, H = 2, 37, 4, 2, 16


def _segments():
    seg = np.ones((B, T), np.int32)
    seg[0, :5] = 0  # left padding
    seg[1, 10:30], seg[1, 30:35], seg[1, 35:] = 2, 3, 0  # three packed documents, then padding
    return jnp.asarray(seg)


def _qkv(dtype=jnp.float32, s=T):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, N, H))
    k, v = rng.normal(size=(B, s, K, H)), rng.normal(size=(B, s, K, H))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@pytest.mark.parametrize("block_q,block_kv", [(8, 16), (16, 8), (64, 64), (5, 7)])
def test_values_and_gradients_match_dense(block_q, block_kv):
    seg = _segments()
    q, k, v = _qkv()
    real = (seg != 0)[:, :, None, None]
    weight = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.float32) * real

    def dense_loss(q, k, v):
        return jnp.sum(attn_lib.grouped_attention(q, k, v, attn_lib.self_mask(seg)) * weight)

    def flash_loss(q, k, v):
        return jnp.sum(flash_attention(q, k, v, seg, seg, block_q=block_q, block_kv=block_kv) * weight)

    dense_out = attn_lib.grouped_attention(q, k, v, attn_lib.self_mask(seg))
    flash_out = flash_attention(q, k, v, seg, seg, block_q=block_q, block_kv=block_kv)
    np.testing.assert_allclose(np.where(real, flash_out, 0), np.where(real, dense_out, 0), atol=2e-6)
    dense_grads = jax.grad(dense_loss, argnums=(0, 1, 2))(q, k, v)
    flash_grads = jax.grad(flash_loss, argnums=(0, 1, 2))(q, k, v)
    for name, want, got in zip("qkv", dense_grads, flash_grads):
        assert np.abs(want).max() > 0.1, name
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"d{name}")


def test_bfloat16_matches_dense_within_bf16_rounding():
    seg = _segments()
    q, k, v = _qkv(jnp.bfloat16)
    real = np.asarray(seg != 0)[:, :, None, None]
    dense = attn_lib.grouped_attention(q, k, v, attn_lib.self_mask(seg)).astype(jnp.float32)
    flash = flash_attention(q, k, v, seg, seg, block_q=8, block_kv=8)
    assert flash.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.where(real, flash.astype(jnp.float32), 0), np.where(real, dense, 0), atol=3e-2)


def test_prefill_over_a_cache_matches_the_dense_cache_mask():
    s, end = 64, 9  # queries written at slots 9..45 of a 64-slot cache; slots 0..3 are invalid
    q, k, v = _qkv(s=s)
    valid = np.zeros((B, s), bool)
    valid[:, 4 : end + T] = True
    valid[1, 20] = False
    valid = jnp.asarray(valid)
    dense = attn_lib.grouped_attention(q, k, v, attn_lib.cache_mask(valid, jnp.int32(end), T))
    flash = flash_attention(q, k, v, jnp.ones((B, T), jnp.int32), valid, jnp.int32(end), block_q=8, block_kv=16)
    np.testing.assert_allclose(flash, dense, atol=2e-6)


def test_backward_memory_grows_linearly_not_quadratically():
    t, n, h = 4096, 2, 8
    seg = jnp.ones((1, t), jnp.int32)
    spec = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)

    def temp_bytes(attend):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores_bytes = n * t * t * 4
    dense = temp_bytes(lambda q, k, v: attn_lib.grouped_attention(q, k, v, attn_lib.self_mask(seg)))
    flash = temp_bytes(lambda q, k, v: flash_attention(q, k, v, seg, seg, block_q=256, block_kv=256))
    assert dense >= scores_bytes, dense
    assert flash < scores_bytes / 16, (flash, scores_bytes)


@pytest.fixture(scope="module")
def tiny_model():
    config = ModelConfig.tiny("qwen3", num_layers=2)
    return config, init_params(config, jax.random.key(0))


def test_model_training_forward_and_gradients_match(tiny_model):
    config, params = tiny_model
    seg = _segments()
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (B, T)), jnp.int32)
    positions = jnp.asarray(np.maximum(np.cumsum(np.asarray(seg) != 0, axis=1) - 1, 0), jnp.int32)
    real = (seg != 0)[..., None]

    def loss(params, impl):
        cfg = config.replace(attention_impl=impl, attention_block_q=8, attention_block_kv=8)
        out, _ = forward(cfg, params, tokens, positions, segment_ids_bt=seg)
        return jnp.sum(jnp.where(real, jax.nn.log_softmax(out), 0.0)[..., 0]), out

    (dense_loss, dense_out), dense_grads = jax.value_and_grad(loss, has_aux=True)(params, "dense")
    (flash_loss, flash_out), flash_grads = jax.value_and_grad(loss, has_aux=True)(params, "flash")
    np.testing.assert_allclose(np.where(real, flash_out, 0), np.where(real, dense_out, 0), atol=1e-4)
    np.testing.assert_allclose(flash_loss, dense_loss, rtol=1e-5)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(dense_grads), jax.tree.leaves(flash_grads)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_model_prefill_with_cache_matches(tiny_model):
    config, params = tiny_model
    seg = _segments()
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (B, T)), jnp.int32)
    positions = jnp.asarray(np.maximum(np.cumsum(np.asarray(seg) != 0, axis=1) - 1, 0), jnp.int32)
    outs = {}
    for impl in ("dense", "flash"):
        cfg = config.replace(attention_impl=impl, attention_block_q=8, attention_block_kv=8)
        cache = init_cache(cfg, B, 48, per_layer=True)
        outs[impl], _ = forward(
            cfg, params, tokens, positions, segment_ids_bt=(seg != 0).astype(jnp.int32), cache=cache
        )
    real = np.asarray(seg != 0)[..., None]
    np.testing.assert_allclose(np.where(real, outs["flash"], 0), np.where(real, outs["dense"], 0), atol=1e-4)


def test_auto_switches_on_the_score_count_and_bad_values_are_named():
    config = ModelConfig.tiny("qwen3")
    assert not config.use_flash_attention(1, 10**6)  # decode keeps its own path
    assert not config.use_flash_attention(1024, 1024)
    assert config.use_flash_attention(4096, 4096)
    assert config.replace(attention_impl="flash").use_flash_attention(8, 8)
    assert not config.replace(attention_impl="dense").use_flash_attention(32768, 32768)
    with pytest.raises(ValueError, match="attention_impl='sparse'"):
        config.replace(attention_impl="sparse")
    with pytest.raises(ValueError, match="attention blocks"):
        config.replace(attention_block_q=0)
