"""The jitted SFT step: gradient accumulation, mixed precision, LoRA (trainable share, learning, export)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polaris_jax.models import ModelConfig, load_hf, logits, make_mesh
from polaris_jax.models import lora as lora_lib
from polaris_jax.models.params import param_shapes
from polaris_jax.train import checkpoint, losses, partitioning
from polaris_jax.train import state as state_lib
from polaris_jax.train.optimizer import make_optimizer
from polaris_jax.train.sft.step import make_sft_step
from tests.train import sft_helpers

VOCAB = 64
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves CPU compile time; both sides of each comparison use it


def _setup(
    model_config,
    *,
    lora_rank=0,
    microbatches=1,
    peak_lr=1e-3,
    steps=50,
    batch_shape=(4, 32),
    std=0.02,
    sgd=False,
    master_weights=False,
):
    mesh = make_mesh({"fsdp": 1})
    rng = jax.random.PRNGKey(0)
    params = partitioning.init_sharded_params(model_config, rng, mesh, std=std)
    if lora_rank:
        model_config, params = lora_lib.add_lora(
            model_config, params, jax.random.PRNGKey(1), rank=lora_rank, alpha=16.0
        )
        mask = lora_lib.lora_mask(params)
    else:
        mask = jax.tree.map(lambda _: True, params)
    optimizer, schedule = make_optimizer(
        peak_lr=peak_lr, total_steps=steps, warmup_ratio=0.0, grad_clip_norm=1.0, master_weights=master_weights
    )
    if sgd:  # updates linear in the gradient: params then compare gradients directly
        optimizer = optax.sgd(schedule)
    shardings = partitioning.state_shardings(model_config, optimizer, mask, mesh)
    state = partitioning.init_sharded_state(params, optimizer, jax.random.PRNGKey(2), mask, shardings)
    step = make_sft_step(
        model_config,
        optimizer,
        schedule,
        mesh=mesh,
        state_shardings=shardings,
        loss_settings=losses.LossSettings(chunk_size=16),
        microbatches=microbatches,
        batch_shape=batch_shape,
        compiler_options=FAST_COMPILE,
    )
    return model_config, state, step, mesh


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


@pytest.fixture(scope="module")
def one_step_results():
    """One SGD step on the same batch with fp32 compute (1 and 2 microbatches) and with bf16 compute."""
    config = ModelConfig.tiny(vocab_size=VOCAB)
    batch = sft_helpers.random_packed_batch(0, batch=4, length=32, vocab=VOCAB)
    results = {}
    for name, model_config, microbatches in [
        ("fp32", config, 1),
        ("fp32_x2", config, 2),
        ("bf16", config.replace(compute_dtype="bfloat16"), 1),
    ]:
        _, state, step, _ = _setup(model_config, microbatches=microbatches, peak_lr=1.0, sgd=True)
        state, metrics = step(state, batch, jax.random.PRNGKey(3))
        results[name] = (jax.device_get(state), jax.device_get(metrics))
    return batch, results


def test_gradient_accumulation_equals_one_big_batch(one_step_results):
    batch, results = one_step_results
    (s1, m1), (s2, m2) = results["fp32"], results["fp32_x2"]
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    assert m1["target_tokens"] == m2["target_tokens"] == batch["loss_mask_bt"].sum()
    # SGD at lr 1: the parameter change is minus the gradient itself.
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_keeps_float32_master_params(one_step_results):
    _, results = one_step_results
    state16, m16 = results["bf16"]
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state16["params"]))
    np.testing.assert_allclose(m16["loss"], results["fp32"][1]["loss"], rtol=2e-2)
    assert m16["loss"] != results["fp32"][1]["loss"]  # the bf16 path really ran in bf16


def test_lora_rank8_trainable_state_is_under_5_percent_of_full_state_on_qwen3_0p6b():
    full_config = ModelConfig.qwen3_0p6b()
    lora_config = full_config.replace(lora_rank=8, lora_alpha=32.0)
    optimizer, _ = make_optimizer(peak_lr=1e-4, total_steps=10)
    shapes = param_shapes(lora_config)
    mask = jax.tree_util.tree_map_with_path(lambda path, _: "_lora_" in jax.tree_util.keystr(path), shapes)

    def state_size(trainable_mask):
        trainable = state_lib.partition(shapes, trainable_mask)[0]
        opt = jax.eval_shape(optimizer.init, trainable)
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves((trainable, opt)))

    full_state = sum(
        int(np.prod(x.shape))
        for x in jax.tree.leaves((param_shapes(full_config), jax.eval_shape(optimizer.init, param_shapes(full_config))))
    )
    lora_state = state_size(mask)
    assert 0 < lora_state <= 0.05 * full_state, (lora_state, full_state)
    assert sum(jax.tree.leaves(mask)) == 7 * 2  # A and B on 7 projections, stacked over the 28 layers


def _cycle_batch(rows: int, length: int, period: int = 8) -> dict:
    """A task LoRA can learn on a random base: each row cycles through `period` tokens from a random start."""
    rng = np.random.default_rng(6)
    symbols = rng.permutation(np.arange(1, VOCAB))[:period]
    sequences = [
        (symbols[(rng.integers(period) + np.arange(length)) % period].astype(np.int32), np.ones(length, np.int32))
        for _ in range(rows)
    ]
    return sft_helpers.packed_batch([[s] for s in sequences], length)


@pytest.fixture(scope="module")
def trained_lora():
    # A random base with large weights stands in for a pretrained one (std 0.02 caps logits near zero).
    config, state, step, _ = _setup(ModelConfig.tiny(vocab_size=VOCAB), lora_rank=8, peak_lr=1e-2, steps=30, std=0.3)
    frozen_before = jax.device_get(state["frozen"])
    batch = _cycle_batch(4, 32)
    losses_seen = []
    for i in range(30):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        losses_seen.append(float(metrics["loss"]))
    return config, state, frozen_before, batch, losses_seen


def test_lora_learns_a_tiny_task_and_trains_only_adapters(trained_lora):
    config, state, frozen_before, _, losses_seen = trained_lora
    assert losses_seen[-1] < 0.2 * losses_seen[0], losses_seen
    trainable_names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])}
    assert trainable_names and all("_lora_" in n for n in trainable_names)
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(state["frozen"]))):
        np.testing.assert_array_equal(a, b)
    mu = state["opt_state"][1][0].mu  # clip -> adamw(scale_by_adam, ...): moments only for adapters
    assert len(jax.tree.leaves(mu)) == len(trainable_names)


def test_lora_merged_export_matches_unmerged_logits(trained_lora, tmp_path):
    config, state, _, batch, _ = trained_lora
    params = state_lib.full_params(state)
    path = checkpoint.export_hf(config, params, str(tmp_path / "hf"))
    merged_config, merged = load_hf(path, dtype="float32")
    assert merged_config.lora_rank == 0
    ids, mask = batch["tokens_bt"][:2, :20], np.ones((2, 20), np.int32)
    unmerged = np.asarray(logits(config, params, ids, mask))
    exported = np.asarray(logits(merged_config, merged, ids, mask))
    assert np.abs(unmerged - exported).max() <= 1e-4 * max(1.0, np.abs(unmerged).max())
    # The adapters matter: the base weights alone give different logits.
    base = {
        k: {n: w for n, w in v.items() if "_lora_" not in n} if isinstance(v, dict) else v for k, v in params.items()
    }
    base_logits = np.asarray(logits(config.replace(lora_rank=0, lora_alpha=0.0), base, ids, mask))
    assert np.abs(base_logits - unmerged).max() > 1e-2
