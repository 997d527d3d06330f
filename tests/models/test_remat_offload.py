"""remat_policy=offload: the same values as no remat, with each layer's input held in pinned host memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polaris_jax.models import ModelConfig
from polaris_jax.models.params import init_params
from polaris_jax.models.transformer import logits
from polaris_jax.tools.compiled_memory import host_offloaded_bytes

TOKENS_BT = np.random.default_rng(0).integers(0, 64, (2, 16))


def _grad_fn(policy: str):
    config = ModelConfig.tiny(vocab_size=64, remat_policy=policy)

    def loss(params):
        return jnp.mean(jax.nn.log_softmax(logits(config, params, TOKENS_BT))[..., 3])

    return config, jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def params():
    return init_params(ModelConfig.tiny(vocab_size=64), jax.random.key(0))


def test_offload_gives_the_values_of_no_remat(params):
    _, reference = _grad_fn("none")
    _, offload = _grad_fn("offload")
    (loss_ref, grads_ref), (loss, grads) = reference(params), offload(params)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for ref, got in zip(jax.tree.leaves(grads_ref), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_offload_keeps_the_stacked_layer_inputs_in_host_memory(params):
    """The backward pass's only stacked residual, [layers, B, T, D], lives in pinned host memory; a full
    remat keeps the same tensor on the device. For TPU the program moves it with placement annotations."""
    config, offload = _grad_fn("offload")
    traced = offload.trace(params)
    layers_btd = (config.num_layers, *TOKENS_BT.shape, config.hidden_size)
    assert host_offloaded_bytes(traced.jaxpr) == np.prod(layers_btd) * 4
    assert host_offloaded_bytes(_grad_fn("full")[1].trace(params).jaxpr) == 0
    tpu = traced.lower(lowering_platforms=("tpu",)).as_text()
    assert "annotate_device_placement" in tpu and '_xla_buffer_placement = "pinned_host"' in tpu
