"""Run by test_grpo_step.py under XLA_FLAGS=--xla_force_host_platform_device_count=8: two GRPO
updates on a data x fsdp x tensor = 2 x 2 x 2 mesh must equal the same updates on one device."""

import jax
import numpy as np

from polaris_jax.models import make_mesh
from polaris_jax.train.grpo import step as grpo_step
from tests.train.grpo import grpo_helpers


def run(mesh):
    settings = grpo_step.UpdateSettings(max_response_len=grpo_helpers.RESPONSE, chunk_size=8, minibatches=2,
                                        microbatches=2, num_iterations=2)
    # SGD: a sharded reduction order changes Adam's sign-like first steps where a gradient is ~0.
    update, state, shardings, _ = grpo_helpers.make_update(settings, mesh=mesh, rows=16, lr=0.5, sgd=True)
    for seed in range(2):
        batch = grpo_step.put_update_batch(grpo_helpers.host_update_batch(seed, rows=16), shardings)
        state, metrics = update(state, batch, jax.random.PRNGKey(seed), None)
    return jax.device_get(state["params"]), jax.device_get(metrics)


def main():
    assert len(jax.devices()) == 8, jax.devices()
    one_params, one_metrics = run(make_mesh({"fsdp": 1}, jax.devices()[:1]))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    many_params, many_metrics = run(mesh)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5), many_params, one_params)
    for key in ("loss", "policy_loss", "clip_fraction", "approx_kl", "entropy", "grad_norm"):
        np.testing.assert_allclose(many_metrics[key], one_metrics[key], rtol=1e-3, atol=1e-6)
    print("MATCH")


if __name__ == "__main__":
    main()
