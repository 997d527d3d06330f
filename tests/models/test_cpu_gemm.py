"""The packed-panel CPU matmul kernel (models/cpu_gemm.cc) against float64 numpy and the XLA model path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import ModelConfig, cpu_gemm, forward, init_params
from polaris_jax.models.transformer import unstack_layers

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="needs the CPU backend and a C++ compiler")
_pack = jax.jit(cpu_gemm.pack, static_argnums=1)
_matmul = jax.jit(cpu_gemm.matmul)


# rows: 1 and 8 (decode), 11 and 17 (partial blocks of 8), 600 (above MAX_KERNEL_ROWS: XLA fallback).
# in/out shapes: a plain [K, N] with N not a multiple of the panel width, q's [D, heads, head_dim] and
# o's [heads, head_dim, D] (two contracted axes).
# bfloat16 weights: compared with the float64 product of their exact values.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 8, 11, 17, 600])
@pytest.mark.parametrize("in_shape,out_shape", [((96,), (50,)), ((64,), (4, 16)), ((4, 16), (40,))])
def test_matmul_matches_float64(rows, in_shape, out_shape, dtype):
    rng = np.random.default_rng(rows)
    w_stored = jnp.asarray(rng.standard_normal(in_shape + out_shape), dtype)
    w = np.asarray(w_stored.astype(jnp.float32))
    x = rng.standard_normal((rows,) + in_shape).astype(np.float32)
    packed = _pack(w_stored, len(in_shape))
    assert packed.panels_pkt.dtype == w_stored.dtype
    assert packed.shape == w.shape and packed.panels_pkt.shape[2] == cpu_gemm.panel_width()
    ours = np.asarray(_matmul(jnp.asarray(x), packed))
    k = int(np.prod(in_shape))
    expected = (x.reshape(rows, k).astype(np.float64) @ w.reshape(k, -1).astype(np.float64)).reshape(ours.shape)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(packed.unpacked_kn().astype(jnp.float32)), w.reshape(k, -1))


def test_batch_axes_are_kept():
    w = jnp.ones((8, 3), jnp.float32)
    out = _matmul(jnp.ones((2, 1, 8), jnp.float32), _pack(w, 1))
    assert out.shape == (2, 1, 3) and np.all(np.asarray(out) == 8.0)


def test_bad_shapes_are_named():
    packed = _pack(jnp.ones((8, 40), jnp.float32), 1)
    with pytest.raises(ValueError, match="input shape"):
        cpu_gemm.matmul(jnp.ones((2, 9), jnp.float32), packed)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_gemm.pack(jnp.ones((8, 4), jnp.float16), 1)
    # The kernel itself checks its buffers: N = 80 needs more panels than this weight has.
    call = jax.ffi.ffi_call(cpu_gemm.TARGETS[jnp.dtype(jnp.float32)], jax.ShapeDtypeStruct((2, 80), jnp.float32))
    with pytest.raises(Exception, match="does not match"):
        jax.block_until_ready(call(jnp.ones((2, 8), jnp.float32), packed.panels_pkt))


@pytest.mark.parametrize("arch,dtype", [("qwen3", "float32"), ("qwen3_moe", "float32"), ("qwen3", "bfloat16")])
def test_packed_decode_layout_gives_the_same_logits(arch, dtype):
    config = ModelConfig.tiny(arch, tie_word_embeddings=arch == "qwen3", param_dtype=dtype, compute_dtype=dtype)
    params = init_params(config, jax.random.key(0))
    layout = unstack_layers(params)
    packed = jax.jit(cpu_gemm.pack_projections)(layout)
    layers = packed[config.layer_runs()[0][0] + "_layers"]
    assert isinstance(packed["lm_head"], cpu_gemm.PackedWeight)
    # bf16: the table is looked up through its uint16 bits (no float32 copy of it in the decode loop)
    assert isinstance(packed["embed"], cpu_gemm.BitsEmbedding) == (dtype == "bfloat16")
    assert all(isinstance(layers[0][n], cpu_gemm.PackedWeight) for n in ("q", "k", "v", "o"))
    if arch == "qwen3_moe":  # expert weights ([E, in, out]) keep XLA's grouped matmul
        assert not any(isinstance(w, cpu_gemm.PackedWeight) for n, w in layers[0].items() if n not in "qkvo")
    tokens = jax.random.randint(jax.random.key(1), (3, 5), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(5), (3, 5))
    expected, _ = jax.jit(forward, static_argnums=0)(config, params, tokens, positions)
    ours, _ = jax.jit(forward, static_argnums=0)(config, packed, tokens, positions)
    tol = 1e-5 if dtype == "float32" else 3e-2  # bf16: rounding of each layer's output may differ
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=tol, atol=tol)


def test_stacked_params_are_refused():
    params = init_params(ModelConfig.tiny("qwen3"), jax.random.key(0))
    with pytest.raises(ValueError, match="unstack_layers"):
        cpu_gemm.pack_projections(params)


def test_without_a_compiler_the_sampler_keeps_xla(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("POLARIS_JAX_CACHE", str(tmp_path / "cache"))
    cpu_gemm._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the CPU matmul kernel failed"):
            assert not cpu_gemm.available()
    finally:
        monkeypatch.undo()
        cpu_gemm._library.cache_clear()
    assert cpu_gemm.available()  # rebuilt from the cache and registered again


def test_sampler_refuses_packing_weights_stored_in_another_dtype():
    from polaris_jax.sampling import generate

    config = ModelConfig.tiny("qwen3", param_dtype="float32", compute_dtype="bfloat16")
    params = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="pack_weights=True needs"):
        generate(config, params, [[1, 2]], max_new_tokens=2, pack_weights=True)


def test_bf16_table_lookup_compiles_without_a_float32_copy_of_the_table():
    config = ModelConfig.tiny("qwen3", param_dtype="bfloat16", compute_dtype="bfloat16", tie_word_embeddings=True)
    layout = unstack_layers(init_params(config, jax.random.key(0)))
    table_f32 = f"f32[{config.vocab_size},{config.hidden_size}]"
    tokens = jnp.zeros((2, 1), jnp.int32)
    compiled = lambda p: jax.jit(forward, static_argnums=0).lower(config, p, tokens, tokens).compile().as_text()
    assert table_f32 in compiled(layout)  # what XLA CPU does with a plain bf16 gather
    assert table_f32 not in compiled(jax.jit(cpu_gemm.pack_projections)(layout))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows,k,n", [(1, 32, 1000), (3, 64, 517), (13, 40, 33), (64, 32, 20_011)])
def test_greedy_logprob_is_argmax_and_log_softmax_of_the_logits(rows, k, n, dtype):
    """The fused kernel never writes the logits; its token is jnp.argmax of `matmul`'s and its logprob
    jax.nn.log_softmax's at that token (N not a multiple of the panel: the zero padding is no column)."""
    rng = np.random.default_rng(rows + n)
    weight = cpu_gemm.pack(jnp.asarray(rng.standard_normal((k, n)), dtype), 1)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    logits = cpu_gemm.matmul(x, weight)
    token, logprob = jax.jit(cpu_gemm.greedy_logprob)(x, weight)
    expected = jnp.argmax(logits, axis=-1)
    np.testing.assert_array_equal(token, expected)
    log_softmax = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(logprob, jnp.take_along_axis(log_softmax, expected[:, None], 1)[:, 0], atol=2e-6)
    token, logprob = jax.jit(cpu_gemm.greedy_logprob, static_argnums=2)(x, weight, False)  # argmax alone
    np.testing.assert_array_equal(token, expected)
    assert np.all(np.isnan(logprob))


def test_greedy_logprob_takes_the_first_of_tied_maxima_across_panels():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 5000)).astype(np.float32)
    w[:, [4000, 100, 2500]] = 3 * np.abs(w[:, [7]])  # three equal best columns in three panels
    x = np.abs(rng.standard_normal((5, 32))).astype(np.float32)
    token, logprob = cpu_gemm.greedy_logprob(jnp.asarray(x), cpu_gemm.pack(jnp.asarray(w), 1))
    np.testing.assert_array_equal(token, [100] * 5)
    assert np.all(logprob < -np.log(3) + 1e-6)  # three columns share the top mass
    np.testing.assert_array_equal(
        cpu_gemm.greedy_logprob(jnp.asarray(x), cpu_gemm.pack(jnp.asarray(w), 1), False)[0], token
    )


def test_greedy_logprob_of_nan_logits_is_a_valid_id():
    """A hostile checkpoint's NaN logits still give an id inside the vocabulary (the last, as the unfused
    sampler's argmax does for an all-NaN row), with a NaN logprob for the run's non-finite checks."""
    w = jnp.full((16, 300), jnp.nan, jnp.float32)
    token, logprob = cpu_gemm.greedy_logprob(jnp.ones((3, 16), jnp.float32), cpu_gemm.pack(w, 1))
    np.testing.assert_array_equal(token, [299] * 3)
    assert np.all(np.isnan(logprob))
