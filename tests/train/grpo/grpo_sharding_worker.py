"""Run by test_grpo_step.py under XLA_FLAGS=--xla_force_host_platform_device_count=8.

python -m tests.train.grpo.grpo_sharding_worker          two GRPO updates on a data x fsdp x tensor =
                                                         2 x 2 x 2 mesh must equal the same updates on
                                                         one device; prints MATCH
python -m tests.train.grpo.grpo_sharding_worker memory   peak bytes per device of the update compiled
                                                         with the activation-sharding context and
                                                         without it; prints MEMORY {json}
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from polaris_jax.models import make_mesh
from polaris_jax.train.grpo import step as grpo_step
from polaris_jax.train.optimizer import make_optimizer
from tests.train.grpo import grpo_helpers


def run(mesh):
    settings = grpo_helpers.settings(minibatches=2, microbatches=2, num_iterations=2)
    # SGD: a sharded reduction order changes Adam's sign-like first steps where a gradient is ~0. At lr 0.2
    # params move by up to ~0.06 while the mesh changes them by ~1e-7; at 0.5 the 8 updates run away (moves
    # of ~0.4) and amplify reduction-order noise to ~4e-5.
    update, state, shardings, _ = grpo_helpers.make_update(settings, mesh=mesh, rows=16, lr=0.2, sgd=True)
    for seed in range(2):
        batch = grpo_step.put_update_batch(grpo_helpers.host_update_batch(seed, rows=16), shardings)
        state, metrics = update(state, batch, jax.random.PRNGKey(seed), None)
    return jax.device_get(state["params"]), jax.device_get(metrics)


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def memory() -> dict:
    """{microbatches: {with, without}} peak bytes: `make_grpo_update` (traced in the activation-sharding
    context) against the same update function jitted bare, with the same shardings and donation (as before)."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    out = {}
    for microbatches in (1, 2):
        settings = grpo_helpers.settings(microbatches=microbatches)
        update, state, shardings, model_config = grpo_helpers.make_update(settings, mesh=mesh, rows=16)
        optimizer, schedule = make_optimizer(peak_lr=1e-2, total_steps=100, grad_clip_norm=1.0)  # as make_update
        replicated = NamedSharding(mesh, PartitionSpec())
        bare = jax.jit(
            grpo_step.grpo_update_fn(model_config, optimizer, schedule, settings),
            in_shardings=(jax.tree.map(lambda x: x.sharding, state), shardings, replicated, None),
            out_shardings=(jax.tree.map(lambda x: x.sharding, state), replicated),
            donate_argnums=(0,),
            compiler_options=grpo_helpers.FAST_COMPILE,
        )
        batch = grpo_step.put_update_batch(grpo_helpers.host_update_batch(0, rows=16), shardings)
        args = (state, batch, jax.random.PRNGKey(0), None)
        out[microbatches] = {
            "with": peak_bytes(update.lower(*args).compile()),
            "without": peak_bytes(bare.lower(*args).compile()),
        }
    return out


def main():
    assert len(jax.devices()) == 8, jax.devices()
    if sys.argv[1:] == ["memory"]:
        print("MEMORY", json.dumps(memory()))
        return
    one_params, one_metrics = run(make_mesh({"fsdp": 1}, jax.devices()[:1]))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    many_params, many_metrics = run(mesh)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5), many_params, one_params)
    for key in ("loss", "policy_loss", "clip_fraction", "approx_kl", "entropy", "grad_norm"):
        np.testing.assert_allclose(many_metrics[key], one_metrics[key], rtol=1e-3, atol=1e-6)
    print("MATCH")


if __name__ == "__main__":
    main()
