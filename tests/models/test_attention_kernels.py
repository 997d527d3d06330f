"""Training attention by kernel: splash (Pallas TPU interpret mode on CPU) against the plain-JAX paths,
`auto` resolved by the platform the function is lowered for, and kernels refused where the backend lacks them."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import attention_kernels, params, transformer
from polaris_jax.models.config import ConfigError, ModelConfig

MOSAIC, CUDNN = "tpu_custom_call", "__cudnn$fmha"


def _case(seed, b, t, heads, kv_heads, head_dim):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, heads, head_dim))
    k = jax.random.normal(ks[1], (b, t, kv_heads, head_dim))
    v = jax.random.normal(ks[2], (b, t, kv_heads, head_dim))
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3 :] = 2  # two packed sequences
    seg[-1, t - 17 :] = 0  # right padding
    return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,t",
    [  # GQA ratios 1, 3 and 8; head dims 64 and 128; rows not a whole number of blocks
        pytest.param(4, 4, 64, 200, marks=pytest.mark.slow),
        (6, 2, 128, 130),
        (8, 1, 64, 96),
        pytest.param(16, 2, 128, 300, marks=pytest.mark.slow),
    ],
)
def test_splash_equals_the_plain_jax_paths_in_interpret_mode(heads, kv_heads, head_dim, t):
    config = ModelConfig.tiny(attention_impl="flash", attention_block_q=128, attention_block_kv=128)
    q, k, v, seg = _case(0, 2, t, heads, kv_heads, head_dim)
    real = np.asarray(seg != 0)[:, :, None, None]
    splash = functools.partial(attention_kernels.splash_attention, config, segment_ids_bt=seg, interpret=True)
    plain = functools.partial(attention_kernels.xla_attention, config, segment_ids_bt=seg)

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(jnp.where(real, out, 0.0) * jnp.cos(out)), out

    (_, got), got_grads = jax.value_and_grad(functools.partial(loss, splash), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, want), want_grads = jax.value_and_grad(functools.partial(loss, plain), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5, rtol=2e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


def _training_forward_text(platform: str, **overrides) -> str:
    config = ModelConfig.tiny(head_dim=128, compute_dtype="bfloat16", **overrides)
    shapes = jax.eval_shape(lambda: params.init_params(config, jax.random.key(0)))
    tokens = jnp.zeros((1, 2048), jnp.int32)
    positions = jnp.arange(2048, dtype=jnp.int32)[None]

    def loss(p):
        return transformer.forward(config, p, tokens, positions)[0].astype(jnp.float32).mean()

    return jax.jit(jax.grad(loss)).trace(shapes).lower(lowering_platforms=(platform,)).as_text()


def test_auto_lowers_splash_for_tpu_and_plain_jax_for_cpu(caplog):
    with caplog.at_level(logging.INFO, logger=attention_kernels.__name__):
        tpu = _training_forward_text("tpu")
    assert MOSAIC in tpu
    assert "tpu: splash" in caplog.text  # auto says what it chose
    assert MOSAIC not in _training_forward_text("cpu")


def test_auto_for_cuda_takes_cudnn_where_it_can_be_traced():
    if reason := attention_kernels.cudnn_unfit(jnp.zeros((1, 8, 2, 128), jnp.bfloat16), None):
        pytest.skip(f"cuda lowering of cuDNN attention: {reason}; `make test-cuda-lowering` runs it with the plugin")
    assert CUDNN in _training_forward_text("cuda")


def test_auto_on_cpu_is_the_plain_path_bit_for_bit():
    config = ModelConfig.tiny()
    q, k, v, seg = _case(1, 2, 64, 4, 2, 16)
    got = jax.jit(functools.partial(attention_kernels.self_attention, config))(q, k, v, seg)
    want = jax.jit(functools.partial(attention_kernels.xla_attention, config))(q, k, v, seg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_kernel_fit_reasons():
    assert "head_dim=96" in attention_kernels.splash_unfit(jnp.zeros((1, 8, 2, 96)), None)
    assert "float32" in attention_kernels.cudnn_unfit(jnp.zeros((1, 8, 2, 128), jnp.float32), None)
    assert "head_dim=12" in attention_kernels.cudnn_unfit(jnp.zeros((1, 8, 2, 12), jnp.bfloat16), None)


@pytest.mark.parametrize(
    "impl,platform,dtype,message",
    [
        ("splash", "gpu", "bfloat16", "runs on tpu only, not on gpu"),
        ("cudnn", "cpu", "bfloat16", "runs on cuda only, not on cpu"),
        ("cudnn", "gpu", "float32", "needs compute_dtype bfloat16 or float16"),
    ],
)
def test_a_kernel_the_backend_lacks_is_a_config_error(impl, platform, dtype, message):
    config = ModelConfig.tiny(attention_impl=impl, compute_dtype=dtype)
    with pytest.raises(ConfigError, match=message):
        attention_kernels.check_platform(config, platform)


@pytest.mark.parametrize("impl", ["auto", "dense", "flash"])
@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_plain_and_auto_fit_every_backend(impl, platform):
    attention_kernels.check_platform(ModelConfig.tiny(attention_impl=impl), platform)


def test_unknown_attention_impl_names_the_choices():
    with pytest.raises(ConfigError, match="'splash', 'cudnn'"):
        ModelConfig.tiny(attention_impl="triton")


def test_run_setup_refuses_a_kernel_this_backend_lacks_before_compiling():
    import ml_collections

    from polaris_jax.train import setup

    config = ml_collections.ConfigDict()
    setup.add_model_sections(config)
    config.model.attention_impl = "cudnn"
    with pytest.raises(ConfigError, match="model.attention_impl: attention_impl='cudnn' runs on cuda only, not on cpu"):
        setup.model_config_from(config)
    assert setup.model_config_from(config, platform=None).attention_impl == "cudnn"  # the planner's view


def worker() -> dict:
    """On 8 fake devices (batch over data=2 x fsdp=2, heads over tensor=2): splash's shard_map, lowered for TPU,
    gives the kernel per-device shapes; run with the plain path as its per-device kernel (the TPU interpreter
    cannot run inside a shard_map here), it equals the plain path on the whole batch."""
    from polaris_jax.models.sharding import activation_sharding, make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config = ModelConfig.tiny(attention_block_q=128)
    q, k, v, seg = _case(2, 4, 160, 8, 2, 64)
    sharded = jax.jit(functools.partial(attention_kernels.splash_on_mesh, config))
    with activation_sharding(mesh):
        text = sharded.trace(q, k, v, seg).lower(lowering_platforms=("tpu",)).as_text()
    kernel_operands = [line.split(" : (")[1].split(")")[0] for line in text.splitlines() if MOSAIC in line]
    real = attention_kernels.splash_attention
    attention_kernels.splash_attention = lambda config, q, k, v, seg, interpret: attention_kernels.xla_attention(
        config, q, k, v, seg
    )
    try:
        with activation_sharding(mesh):
            got = jax.jit(functools.partial(attention_kernels.splash_on_mesh, config))(q, k, v, seg)
    finally:
        attention_kernels.splash_attention = real
    want = attention_kernels.xla_attention(config, q, k, v, seg)
    return {"max_error": float(np.max(np.abs(np.asarray(got) - np.asarray(want)))), "kernel_operands": kernel_operands}


def test_splash_runs_per_device_in_its_shard_map():
    from tests.fake_devices import run_on_8_devices

    result = run_on_8_devices("tests.models.test_attention_kernels", "worker()", timeout=300)
    assert result["max_error"] < 1e-6
    # Each device's kernel sees one row's q with half the heads ([4, 256, 64]), and one kv head ([1, 256, 64]).
    assert result["kernel_operands"]
    for operands in result["kernel_operands"]:
        assert "tensor<4x256x64xf32>, tensor<1x256x64xf32>" in operands, operands
