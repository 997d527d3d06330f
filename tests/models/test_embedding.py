"""The sharded embedding lookup (models.embedding) equals `table[tokens]` in value and gradient on 8 fake
devices, for meshes that split the table along embed and vocab and the tokens along batch and length; and it
gathers no whole table."""

import pytest

from tests.fake_devices import run_on_8_devices

MESHES = {
    "fsdp8": {"fsdp": 8},
    "fsdp2_sequence4": {"fsdp": 2, "sequence": 4},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "tensor2_sequence4": {"tensor": 2, "sequence": 4},
}


def worker(mesh_shape: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding

    from polaris_jax.models import embedding
    from polaris_jax.models.sharding import DEFAULT_RULES, activation_sharding, logical_to_spec, make_mesh

    mesh = make_mesh(mesh_shape)
    vocab, d, b, t = 96, 64, 4, 32
    rng = np.random.default_rng(0)
    table = rng.normal(size=(vocab, d)).astype(np.float32)
    tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
    weights = rng.normal(size=(b, t, d)).astype(np.float32)
    shard = lambda x, axes: jax.device_put(x, NamedSharding(mesh, logical_to_spec(axes, mesh, DEFAULT_RULES, x.shape)))  # noqa: E731
    table_d, tokens_d = shard(table, ("vocab", "embed")), shard(tokens, ("batch", "length"))

    def loss(tab, tok):
        with activation_sharding(mesh, DEFAULT_RULES):
            x = embedding.lookup(tab, tok, jnp.float32)
        return jnp.sum(x * weights), x

    (_, x), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(table_d, tokens_d)
    expected_grad = np.zeros_like(table)
    np.add.at(expected_grad, tokens, weights)
    hlo = jax.jit(jax.grad(lambda tab, tok: loss(tab, tok)[0])).lower(table_d, tokens_d).compile().as_text()
    whole = f"f32[{vocab},{d}]"
    return {
        "value_error": float(np.max(np.abs(np.asarray(x) - table[tokens]))),
        "grad_error": float(np.max(np.abs(np.asarray(grad) - expected_grad))),
        "whole_table_buffers": sum(whole in line.split("=")[1][:40] for line in hlo.splitlines() if "=" in line),
        "table_sharded": int(np.prod(table_d.sharding.shard_shape(table.shape))) < table.size,
    }


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_lookup_equals_the_plain_lookup(name):
    r = run_on_8_devices("tests.models.test_embedding", f"worker({MESHES[name]!r})", timeout=300)
    assert r["table_sharded"]
    assert r["value_error"] == 0.0
    assert r["grad_error"] < 1e-5
    assert r["whole_table_buffers"] == 0
