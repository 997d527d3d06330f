"""The experts' grouped-matmul layouts (models.grouped_matmul) against XLA's `jax.lax.ragged_dot` and a per-group
numpy loop: empty groups, rows past the groups (zero), the tiled kernel's chunked gathers, and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import grouped_matmul
from polaris_jax.tools.hlo_flops import matmul_flops

GROUP_SIZES = [5, 0, 17, 3, 1]  # 26 of 30 rows grouped; the last 4 belong to no group


def _inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(30, 12)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(GROUP_SIZES), 12, 7)), jnp.float32)
    return x, w, jnp.asarray(GROUP_SIZES, jnp.int32)


def _numpy_reference(x, w) -> np.ndarray:
    out, start = np.zeros((x.shape[0], w.shape[-1]), np.float64), 0
    for g, size in enumerate(GROUP_SIZES):
        out[start : start + size] = np.asarray(x[start : start + size], np.float64) @ np.asarray(w[g], np.float64)
        start += size
    return out


def _through(layout_cls, x, w, group_sizes):
    layout = layout_cls(group_sizes, x.shape[0])
    return layout.leave(layout.matmul(layout.enter(x), w))


@pytest.mark.parametrize("gather_bytes", [None, 12 * 7 * 4 * 3])  # one gather, or 3 tiles' weights per step
def test_tiled_equals_ragged_dot_and_numpy_with_gradients(monkeypatch, gather_bytes):
    if gather_bytes:
        monkeypatch.setattr(grouped_matmul, "GATHER_BYTES", gather_bytes)
    x, w, group_sizes = _inputs()
    tiled = jax.jit(lambda x, w: _through(grouped_matmul.TiledLayout, x, w, group_sizes))
    np.testing.assert_allclose(tiled(x, w), _numpy_reference(x, w), atol=1e-4)
    np.testing.assert_allclose(tiled(x, w), jax.lax.ragged_dot(x, w, group_sizes), atol=1e-4)
    assert not np.any(np.asarray(tiled(x, w))[sum(GROUP_SIZES) :])
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    ours = jax.grad(loss(tiled), argnums=(0, 1))(x, w)
    xla = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, group_sizes)), argnums=(0, 1))(x, w)
    for a, b in zip(ours, xla):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_ragged_layout_and_auto_on_cpu_equal_the_reference():
    x, w, group_sizes = _inputs()
    np.testing.assert_allclose(
        _through(grouped_matmul.RaggedLayout, x, w, group_sizes), _numpy_reference(x, w), atol=1e-4
    )
    mm = lambda layout, x: layout.leave(layout.matmul(layout.enter(x), w))
    auto = jax.jit(lambda x: grouped_matmul.run("auto", mm, x, group_sizes))
    np.testing.assert_allclose(auto(x), _numpy_reference(x, w), atol=1e-4)
    # auto lowers the tiled path for CPU: its dots cover the padded tiles, not every group's copy of all rows
    tiles = grouped_matmul.TiledLayout(group_sizes, x.shape[0])
    flops = matmul_flops(auto.lower(x).compile().as_text())
    assert flops == 2 * tiles.tiles * tiles.tile * 12 * 7 < 2 * len(GROUP_SIZES) * x.shape[0] * 12 * 7


def test_capacity_layout_is_one_batched_matmul_per_group():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3 * 4, 6)), jnp.float32)  # 3 groups of 4 slots
    w = jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.float32)
    y = grouped_matmul.CapacityLayout(3).matmul(x, w)
    expected = np.concatenate([np.asarray(x[4 * g : 4 * g + 4]) @ np.asarray(w[g]) for g in range(3)])
    np.testing.assert_allclose(y, expected, atol=1e-4)


def test_an_unknown_kernel_names_the_choices():
    x, w, group_sizes = _inputs()
    with pytest.raises(ValueError, match="moe_matmul='megablox'.*auto"):
        grouped_matmul.make_layout("megablox", group_sizes, x.shape[0])


def test_the_chunked_backward_gathers_again_instead_of_keeping_every_tiles_weights(monkeypatch):
    """With gathers bounded to 2 tiles' weights, the gradient's compiled temporaries stay below the weights of
    all tiles ([tiles, in, out], 16.8 MB): the backward pass gathers each chunk again (2.6 MB; keeping every
    chunk's gathered weights took 19.4 MB)."""
    groups, rows, width = 32, 256, 256
    tile_weights = width * width * 4
    monkeypatch.setattr(grouped_matmul, "GATHER_BYTES", 2 * tile_weights)
    group_sizes = jnp.full((groups,), rows // groups, jnp.int32)
    x = jax.ShapeDtypeStruct((rows, width), jnp.float32)
    w = jax.ShapeDtypeStruct((groups, width, width), jnp.float32)
    tiles = grouped_matmul.TiledLayout(group_sizes, rows).tiles
    loss = lambda x, w: jnp.sum(_through(grouped_matmul.TiledLayout, x, w, group_sizes) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < tiles * tile_weights, (tiles, compiled.memory_analysis())
