"""hlo_flops counts dot FLOPs of compiled programs, multiplying loop bodies by their trip counts."""

import jax
import jax.numpy as jnp
import pytest

from polaris_jax.tools.hlo_flops import matmul_flops


def _compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_single_matmul_counts_2mkn():
    a, b = jnp.ones((32, 48)), jnp.ones((48, 16))
    assert matmul_flops(_compiled_text(lambda x, y: x @ y, a, b)) == 2 * 32 * 48 * 16


def test_batched_einsum():
    a, b = jnp.ones((4, 8, 24)), jnp.ones((4, 24, 40))
    text = _compiled_text(lambda x, y: jnp.einsum("bik,bkj->bij", x, y), a, b)
    assert matmul_flops(text) == 2 * 4 * 8 * 24 * 40


@pytest.mark.parametrize("layers", [3, 7])
def test_scan_body_is_counted_once_per_iteration(layers):
    """XLA's cost_analysis visits a while body once; the scan of `layers` matmuls must count them all."""
    x, w = jnp.ones((16, 32)), jnp.ones((layers, 32, 32))

    def f(x, w):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]

    assert matmul_flops(_compiled_text(f, x, w)) == layers * 2 * 16 * 32 * 32


def test_grad_of_scan_counts_forward_and_backward():
    """Backward of y = x @ w needs dx and dw: three matmuls of the forward's size per layer."""
    layers = 4
    x, w = jnp.ones((16, 32)), jnp.ones((layers, 32, 32))

    def loss(w, x):
        return jnp.sum(jax.lax.scan(lambda h, wl: (h @ wl, None), x, w)[0])

    text = _compiled_text(jax.grad(loss), w, x)
    assert matmul_flops(text) == 3 * layers * 2 * 16 * 32 * 32
