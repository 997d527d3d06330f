"""The paged-attention kernels (`models.paged_kernels`) equal the plain-JAX reference: the Pallas ones in
Pallas interpret mode on CPU, the C++ CPU one (`cpu_paged.cc`) as it runs (float32, 1e-5). Random page tables
over a random pool (every unread position is garbage), ragged lengths, GQA, rows sharing prefix pages, a
padding row (length 0, position -1) and a row whose query sits before its length. `attend_by_platform` is
the reference on CPU under "auto", bit for bit, and stages each Pallas kernel only for its platform and only
where it fits (checked on the lowered StableHLO); the engine names the CPU kernel on one CPU device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import paged_kernels
from polaris_jax.models.paged_attention import NULL_PAGE, paged_attention
from polaris_jax.models.params import init_params

TOL = dict(rtol=1e-5, atol=1e-5)
_reference = jax.jit(paged_attention, static_argnames=("scale", "pages_per_block"))


def paged_case(seed, *, rows=6, kv_heads=2, heads=8, head_dim=16, page_size=4, max_pages=7, num_pages=40, t=1):
    """(q_bthd, k_pages, v_pages, table_bp, lengths_b, positions_bt). Row 0 is padding, row 3 shares row 2's
    first two pages (a fork), row 4 fills the table, row 5's query is at position 9 of 20 cached tokens."""
    rng = np.random.default_rng(seed)
    pool_shape = (kv_heads, num_pages, page_size, head_dim)
    k_pages, v_pages = (rng.standard_normal(pool_shape).astype(np.float32) for _ in range(2))
    cap = max_pages * page_size
    lengths_b = np.array([0, 1, 2 * page_size + 1, 3 * page_size, cap, 20][:rows], np.int32)
    table_bp = np.full((rows, max_pages), NULL_PAGE, np.int32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    for b, n in enumerate(lengths_b):
        for slot in range(-(-n // page_size)):
            table_bp[b, slot] = free.pop()
    table_bp[3, :2] = table_bp[2, :2]
    positions_bt = (lengths_b[:, None] - t + np.arange(t)[None]).astype(np.int32)
    positions_bt[0] = -1
    positions_bt[5] = 9 - t + 1 + np.arange(t)
    q_bthd = rng.standard_normal((rows, t, heads, head_dim)).astype(np.float32)
    return q_bthd, k_pages, v_pages, table_bp, lengths_b, positions_bt


def check_against_reference(kernel, case, **options):
    scale = case[0].shape[-1] ** -0.5
    want = np.asarray(_reference(*case, scale=scale, pages_per_block=2))
    got = np.asarray(jax.jit(functools.partial(kernel, scale=scale, **options))(*case))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[0], 0.0)  # the padding row
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize(
    "geometry",
    [
        dict(kv_heads=2, heads=8, head_dim=16, page_size=4, max_pages=7),  # one split, table padded 7 -> 32 pages
        dict(kv_heads=1, heads=4, head_dim=32, page_size=16, max_pages=20),  # 3 splits of 8 pages, combined
    ],
    ids=["page4", "splits"],
)
def test_gpu_kernel_equals_reference_in_interpret_mode(geometry):
    case = paged_case(1, **geometry)
    assert not paged_kernels.KERNELS.meta("gpu")["unfit"](*case[:3])
    check_against_reference(paged_kernels.gpu_kernel, case, interpret=True)


def test_tpu_kernel_equals_reference_in_interpret_mode():
    """The kernel casts K and V to bfloat16 after the DMA (even float32 pages), so the pool holds values a
    bfloat16 represents exactly; q stays float32, and then so do both products."""
    q_bthd, k_pages, v_pages, *rest = paged_case(2, head_dim=128, page_size=16, max_pages=5, num_pages=24)
    k_pages, v_pages = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (k_pages, v_pages))
    case = (q_bthd, k_pages, v_pages, *rest)
    assert not paged_kernels.KERNELS.meta("tpu")["unfit"](*case[:3])
    check_against_reference(paged_kernels.tpu_kernel, case, interpret=True)


@pytest.mark.parametrize(
    "geometry",
    [
        dict(kv_heads=2, heads=8, head_dim=16, page_size=4, max_pages=7),
        dict(kv_heads=2, heads=4, head_dim=24, page_size=4, max_pages=7),  # head_dim not a multiple of 16 floats
        dict(kv_heads=4, heads=4, head_dim=128, page_size=16, max_pages=5, num_pages=24),  # one query head per kv
    ],
    ids=["page4", "dim24", "mha128"],
)
def test_cpu_kernel_equals_reference(geometry):
    case = paged_case(5, **geometry)
    assert not paged_kernels.KERNELS.meta("cpu")["unfit"](*case[:3])
    check_against_reference(paged_kernels.cpu_kernel, case)


def test_the_engine_takes_the_cpu_kernel_on_one_cpu_device_only():
    from polaris_jax.models.config import ModelConfig
    from polaris_jax.models.sharding import make_mesh
    from polaris_jax.sampling import Engine, EngineSettings

    config = ModelConfig.tiny()
    params = init_params(config, jax.random.key(0))
    settings = lambda kernel: EngineSettings(max_slots=2, num_pages=8, max_seq_len=64, attention_kernel=kernel)
    assert Engine(config, params, settings("auto")).config.paged_attention_impl == "cpu"
    assert Engine(config, params, settings("xla")).config.paged_attention_impl == "xla"
    assert (
        Engine(config.replace(paged_attention_impl="xla"), params, settings("auto")).config.paged_attention_impl
        == "xla"
    )
    mesh = make_mesh({"data": 1})
    assert Engine(config, params, settings("auto"), mesh=mesh).config.paged_attention_impl == "cpu"
    bf16 = config.replace(compute_dtype="bfloat16")  # bfloat16 pages: the reference
    q, pages = paged_kernels._decode_shapes(bf16, 8, 16, jnp.bfloat16)
    assert "float32 pages" in paged_kernels.KERNELS.meta("cpu")["unfit"](q, pages, pages)


@pytest.mark.parametrize("t", [1, 3], ids=["decode", "chunk"])
def test_attend_by_platform_is_the_reference_on_cpu(t):
    case = paged_case(3, head_dim=128, page_size=16, max_pages=5, num_pages=24, t=t)
    scale = 128**-0.5
    got = jax.jit(functools.partial(paged_kernels.attend_by_platform, scale=scale))(*case)
    want = jax.jit(functools.partial(paged_attention, scale=scale))(*case)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _custom_calls(geometry, t, platform):
    case = paged_case(4, t=t, **geometry)
    fn = jax.jit(functools.partial(paged_kernels.attend_by_platform, scale=0.1))
    text = fn.trace(*case).lower(lowering_platforms=(platform,)).as_text()
    return {name for name in ("__gpu$xla.gpu.triton", "tpu_custom_call") if name in text}


@pytest.mark.parametrize(
    "geometry,t,platform,want",
    [
        (dict(head_dim=128, page_size=16, max_pages=5), 1, "cpu", set()),
        (dict(head_dim=128, page_size=16, max_pages=5), 1, "cuda", {"__gpu$xla.gpu.triton"}),
        (dict(head_dim=128, page_size=16, max_pages=5), 1, "tpu", {"tpu_custom_call"}),
        (dict(head_dim=128, page_size=16, max_pages=5), 3, "cuda", set()),  # chunked prefill: the reference
        (dict(head_dim=64, page_size=16, max_pages=5), 1, "tpu", set()),  # head_dim under 128 lanes
        (dict(head_dim=24, page_size=4, max_pages=5), 1, "cuda", set()),  # not a power of two
    ],
)
def test_each_platform_lowers_its_kernel_only_where_it_fits(geometry, t, platform, want):
    assert _custom_calls(geometry, t, platform) == want


def test_registry_names_and_reasons():
    assert sorted(paged_kernels.kernel_names()) == ["cpu", "gpu", "tpu"]
    q = jax.ShapeDtypeStruct((2, 3, 8, 64), jnp.float32)
    pages = jax.ShapeDtypeStruct((2, 10, 16, 64), jnp.float32)
    assert "t=3" in paged_kernels.KERNELS.meta("gpu")["unfit"](q, pages, pages)
    q1 = jax.ShapeDtypeStruct((2, 1, 8, 64), jnp.float32)
    assert set(paged_kernels.branches(q1, pages, pages, scale=0.1)) == {"cuda"}  # "auto" never stages "cpu"


@pytest.mark.parametrize(
    "impl,platform,want",
    [
        ("auto", "cuda", {"__gpu$xla.gpu.triton"}),
        ("xla", "cuda", set()),  # the switch turns the kernel off
        ("xla", "tpu", set()),
        ("tpu", "tpu", {"tpu_custom_call"}),
        ("gpu", "cuda", {"__gpu$xla.gpu.triton"}),
    ],
)
def test_the_config_switch_picks_the_kernel(impl, platform, want):
    case = paged_case(4, t=1, head_dim=128, page_size=16, max_pages=5)
    fn = jax.jit(functools.partial(paged_kernels.attend_by_platform, scale=0.1, impl=impl))
    text = fn.trace(*case).lower(lowering_platforms=(platform,)).as_text()
    assert {name for name in ("__gpu$xla.gpu.triton", "tpu_custom_call") if name in text} == want


def test_a_named_kernel_that_cannot_run_is_a_config_error_before_compiling():
    from polaris_jax.models.config import ConfigError, ModelConfig
    from polaris_jax.sampling import Engine, EngineSettings

    config = ModelConfig.tiny()  # head_dim 16: Mosaic wants 128 lanes
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    settings = lambda kernel: EngineSettings(max_slots=2, num_pages=8, max_seq_len=64, attention_kernel=kernel)
    with pytest.raises(ConfigError, match="'tpu' runs on tpu only, not on cpu"):
        Engine(config, params, settings("tpu"))
    q = jax.ShapeDtypeStruct((1, 1, 4, 16), jnp.float32)
    pages = jax.ShapeDtypeStruct((2, 8, 16, 16), jnp.float32)
    with pytest.raises(ConfigError, match="head_dim=16: Mosaic wants a multiple of 128"):
        paged_kernels.check_kernel("tpu", "tpu", q, pages, pages)
    with pytest.raises(ValueError, match="attention_kernel='triton' is not one of"):
        Engine(config, params, settings("triton"))
