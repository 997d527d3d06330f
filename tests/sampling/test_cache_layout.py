"""The decode cache layout (per-layer, head-major) and per-layer params give the model's own logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import forward, init_cache, logits
from polaris_jax.models.attention import HeadMajorKV, write_cache_layer
from polaris_jax.models.transformer import unstack_layers
from tests.sampling.conftest import golden


@pytest.mark.parametrize("name", ["qwen3_tied", "qwen3_moe"])
@pytest.mark.parametrize("per_layer_params", [False, True])
def test_incremental_decode_matches_full_forward(name, per_layer_params):
    model = golden(name)
    arrays = np.load(f"tests/golden/{name}/golden.npz")
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    params = unstack_layers(model.params) if per_layer_params else model.params
    cache = init_cache(model.config, ids.shape[0], 16, per_layer=True)
    chunks = [(0, 8)] + [(t, t + 1) for t in range(8, ids.shape[1])]  # prefill 8, then one token at a time
    step = jax.jit(functools.partial(forward, model.config))
    outs = []
    for a, b in chunks:
        out, cache = step(params, ids[:, a:b], positions[:, a:b], segment_ids_bt=mask[:, a:b], cache=cache)
        outs.append(np.asarray(out))
    expected = np.asarray(logits(model.config, model.params, ids, mask))
    err = np.abs(np.concatenate(outs, 1) - expected)[mask.astype(bool)].max()
    assert err < 1e-4, err


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_major_write_places_tokens(dtype):
    b, s, kv, h, t, end = 2, 8, 3, 4, 2, 5
    k_btkh = jnp.asarray(np.random.RandomState(0).randn(b, t, kv, h), dtype)
    v_btkh = k_btkh + 1
    k_cache = HeadMajorKV(jnp.zeros((b, kv, h, s), dtype), True)
    v_cache = HeadMajorKV(jnp.zeros((b, kv, s, h), dtype), False)
    k_cache, v_cache = write_cache_layer(k_cache, v_cache, k_btkh, v_btkh, jnp.int32(end))
    assert k_cache.data.dtype == dtype and v_cache.data.dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(k_cache.data[..., end : end + t], np.float32), np.asarray(k_btkh, np.float32).transpose(0, 2, 3, 1)
    )
    np.testing.assert_array_equal(
        np.asarray(v_cache.data[:, :, end : end + t], np.float32), np.asarray(v_btkh, np.float32).transpose(0, 2, 1, 3)
    )
    assert not np.asarray(k_cache.data[..., :end], np.float32).any()
    assert not np.asarray(v_cache.data[:, :, end + t :], np.float32).any()
