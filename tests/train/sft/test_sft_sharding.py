"""3 SFT steps on a (fsdp=4, tensor=2) mesh of 8 fake CPU devices give the 1-device params."""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    import jax, numpy as np
    from polaris_jax.models import ModelConfig, make_mesh
    from polaris_jax.models.params import param_shapes
    from polaris_jax.train import losses, partitioning
    from polaris_jax.train.optimizer import make_optimizer
    from polaris_jax.train.sft.step import make_sft_step
    from tests.train import sft_helpers
    assert len(jax.devices()) == 8
    config = ModelConfig.tiny(vocab_size=64)
    batches = [sft_helpers.random_packed_batch(seed, batch=8, length=32, vocab=64) for seed in range(3)]

    def train(mesh):
        optimizer, schedule = make_optimizer(peak_lr=1e-3, total_steps=3, grad_clip_norm=1.0)
        mask = jax.tree.map(lambda _: True, param_shapes(config))
        shardings = partitioning.state_shardings(config, optimizer, mask, mesh)
        params = partitioning.init_sharded_params(config, jax.random.PRNGKey(0), mesh)
        state = partitioning.init_sharded_state(params, optimizer, jax.random.PRNGKey(1), mask, shardings)
        step = make_sft_step(config, optimizer, schedule, mesh=mesh, state_shardings=shardings, microbatches=2,
                             loss_settings=losses.LossSettings(chunk_size=16), batch_shape=(8, 32))
        batch_shardings = partitioning.batch_shardings(mesh, batch_shape=(8, 32))
        losses_seen = []
        for i, batch in enumerate(batches):
            state, metrics = step(state, partitioning.put_batch(batch, batch_shardings), jax.random.PRNGKey(i))
            losses_seen.append(float(metrics["loss"]))
        return state, losses_seen

    single, single_losses = train(make_mesh({"fsdp": 1}, devices=jax.devices()[:1]))
    sharded, sharded_losses = train(make_mesh({"data": 1, "fsdp": 4, "tensor": 2}))
    leaves = jax.tree.leaves(sharded["params"])
    assert all(len(x.sharding.device_set) == 8 for x in leaves)
    assert sum(not x.sharding.is_fully_replicated for x in leaves) >= 8
    mu = jax.tree.leaves(sharded["opt_state"][1][0].mu)
    assert [m.sharding.spec for m in mu] == [p.sharding.spec for p in leaves]
    np.testing.assert_allclose(single_losses, sharded_losses, rtol=1e-5)
    worst = 0.0
    for a, b in zip(jax.tree.leaves(jax.device_get(single["params"])), jax.tree.leaves(jax.device_get(leaves))):
        worst = max(worst, float(np.abs(a - b).max()))
    assert worst <= 3e-5, worst  # Adam moves near-zero-gradient weights by up to lr=1e-3 on rounding noise
    print("sharded ok", worst, single_losses)
""")


def test_sharded_steps_equal_single_device():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert "sharded ok" in result.stdout
