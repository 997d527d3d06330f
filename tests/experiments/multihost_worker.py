"""One process of the multi-host SFT test: 3 sharded SFT steps of a tiny Qwen3 on a data x fsdp mesh.

    python tests/experiments/multihost_worker.py OUT.npz LOCAL_DEVICES

Run alone it is the single-process reference (LOCAL_DEVICES = the whole mesh). With
POLARIS_COORDINATOR_ADDRESS / POLARIS_NUM_PROCESSES / POLARIS_PROCESS_ID set, several copies form
one mesh over all their devices through `polaris_jax.distributed` (gloo collectives on CPU); each
feeds only its own rows of the global batch. Process 0 writes the losses and the final params, and
every process takes part in the Hugging Face export to OUT.npz.hf (process 0 writes it) and in
sampling from the trained params on the same mesh.
"""

import dataclasses
import os
import sys

OUT, LOCAL_DEVICES = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
os.environ["JAX_PLATFORMS"] = "cpu"

from polaris_jax.distributed import maybe_initialize_distributed  # noqa: E402

maybe_initialize_distributed()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from polaris_jax.models import DEFAULT_RULES, ModelConfig, make_mesh, param_shapes  # noqa: E402
from polaris_jax.sampling import generate  # noqa: E402
from polaris_jax.train import partitioning  # noqa: E402
from polaris_jax.train import state as state_lib  # noqa: E402
from polaris_jax.train.checkpoint import export_hf  # noqa: E402
from polaris_jax.train.grpo import step as grpo_step  # noqa: E402
from polaris_jax.train.optimizer import make_optimizer  # noqa: E402
from polaris_jax.train.sft.step import make_sft_step  # noqa: E402

BATCH, LENGTH, STEPS = 8, 16, 3
MESH = {"data": 2, "fsdp": 2}


def global_batch(step: int) -> dict:
    """The same [B, T] batch in every process: two packed segments per row, loss on the second half."""
    rng = np.random.default_rng(step)
    tokens = rng.integers(1, 256, size=(BATCH, LENGTH + 1)).astype(np.int32)
    segments = np.where(np.arange(LENGTH) < LENGTH // 2, 1, 2)[None].repeat(BATCH, 0).astype(np.int32)
    positions = np.where(segments == 1, np.arange(LENGTH), np.arange(LENGTH) - LENGTH // 2).astype(np.int32)
    return {
        "tokens_bt": tokens[:, :-1],
        "positions_bt": positions,
        "segment_ids_bt": segments,
        "targets_bt": tokens[:, 1:],
        "loss_mask_bt": (positions > 0).astype(np.int32),
    }


def local_rows(batch: dict) -> dict:
    """This process's rows: batch rows are sharded over (data, fsdp) in process order."""
    per_process = BATCH // jax.process_count()
    start = jax.process_index() * per_process
    return {k: v[start : start + per_process] for k, v in batch.items()}


def main():
    if jax.device_count() != 4:
        raise SystemExit(f"expected 4 global devices, got {jax.device_count()}")
    config = ModelConfig.tiny()
    mesh = make_mesh(MESH)
    optimizer, schedule = make_optimizer(peak_lr=1e-2, total_steps=STEPS)
    mask = jax.tree.map(lambda _: True, param_shapes(config))
    shardings = partitioning.state_shardings(config, optimizer, mask, mesh, DEFAULT_RULES)
    params = partitioning.init_sharded_params(config, jax.random.key(0), mesh, DEFAULT_RULES)
    # jit with out_shardings, not device_put: device_put cannot place a process-local value onto devices
    # of other processes, while jit treats it as a replicated input and each process builds its shards.
    state = jax.jit(lambda p, key: state_lib.init_state(p, optimizer, key, mask), out_shardings=shardings)(
        params, jax.random.key(1)
    )
    step_fn = make_sft_step(
        config, optimizer, schedule, mesh=mesh, state_shardings=shardings, batch_shape=(BATCH, LENGTH)
    )
    batch_shardings = partitioning.batch_shardings(mesh, DEFAULT_RULES, (BATCH, LENGTH))
    losses = []
    for step in range(STEPS):
        batch = global_batch(step)
        if jax.process_count() > 1:
            batch = local_rows(batch)
        step_rng = jax.random.fold_in(state["rng"], step)
        state, metrics = step_fn(state, partitioning.put_batch(batch, batch_shardings), step_rng)
        losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    export_hf(config, state["params"], OUT + ".hf")  # every process; process 0 writes
    blocker = OUT + ".file"  # a file where the export's parent directory should be
    if jax.process_index() == 0:
        open(blocker, "w").close()
    multihost_utils.sync_global_devices("blocker written")
    try:
        export_hf(config, state["params"], os.path.join(blocker, "hf"))
        raise SystemExit("an export under a file did not fail")
    except OSError as e:  # multi-process: on every process, with process 0's reason
        if jax.process_count() > 1 and "process 0 cannot write the export" not in str(e):
            raise
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    greedy = generate(config, state["params"], prompts, max_new_tokens=12, temperature=0.0, mesh=mesh)
    sampled = generate(
        config,
        state["params"],
        prompts,
        max_new_tokens=12,
        temperature=1.0,
        n=2,
        seed=7,
        eos_token_ids=(3, 4, 5, 6, 7, 8, 9, 10),
        mesh=mesh,
    )
    samples = {
        "greedy_tokens": np.asarray(greedy.tokens),
        "sampled_tokens": _ragged(sampled.tokens),
        "sampled_reasons": np.asarray(sampled.finish_reasons),
    }

    # A GRPO update batch is whole on every process (the rollout gathered it); in its shards it must hold
    # exactly those values.
    def rows(name):
        shape = (
            (BATCH,) if name.endswith("_b") else (BATCH, LENGTH, 2, 2) if name.endswith("_btlk") else (BATCH, LENGTH)
        )
        return np.arange(np.prod(shape)).reshape(shape).astype(np.float32)

    update = grpo_step.UpdateBatch(**{f.name: rows(f.name) for f in dataclasses.fields(grpo_step.UpdateBatch)})
    shardings = grpo_step.batch_shardings(mesh, DEFAULT_RULES, BATCH, replay=True)  # with router replay's experts
    placed = grpo_step.put_update_batch(update, shardings)
    gathered_update = multihost_utils.process_allgather(placed, tiled=True)
    for f in dataclasses.fields(update):
        if not np.array_equal(np.asarray(getattr(gathered_update, f.name)), getattr(update, f.name)):
            raise SystemExit(f"put_update_batch changed {f.name}")
    gathered = multihost_utils.process_allgather(state["params"], tiled=True)
    if jax.process_index() == 0:
        flat = {
            jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(gathered)
        }
        np.savez(OUT, losses=np.asarray(losses), process_count=jax.process_count(), **samples, **flat)


def _ragged(rows: list[list[int]]) -> np.ndarray:
    """Token lists padded with -1 into one array."""
    out = np.full((len(rows), max(map(len, rows))), -1, np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


if __name__ == "__main__":
    main()
