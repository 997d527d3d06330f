"""The SFT training loop: `run(config, workdir) -> final metrics`, the `sft` job of polaris_jax.main.

    python -m polaris_jax.main --config=configs/sft_tiny.py --workdir=/tmp/sft_tiny

Layout of the workdir: config.json, data/ (synthetic task files), checkpoints/<step>/ (orbax: state +
data iterator), metrics.jsonl + TensorBoard events, export/hf/ (the final model in HF layout).
A rerun with the same workdir resumes from the latest checkpoint, exactly: the same params,
optimiser state, step, rng and the same next batch as a run that was never interrupted.
"""

from __future__ import annotations

import logging
import os
import time

import jax

from polaris_jax.models.sharding import mesh_from_config, sharding_rules
from polaris_jax.train import checkpoint as checkpoint_lib
from polaris_jax.train import losses, partitioning, setup
from polaris_jax.train import metrics as metrics_lib
from polaris_jax.train import state as state_lib
from polaris_jax.train.optimizer import optimizer_from_config
from polaris_jax.train.sft import data as sft_data
from polaris_jax.train.sft.step import make_sft_step

logger = logging.getLogger(__name__)


def loss_settings_from_config(config) -> losses.LossSettings:
    t = config.train
    return losses.LossSettings(
        chunk_size=t.loss_chunk_size, z_loss_coef=t.z_loss_coef, router_aux_coef=t.router_aux_coef
    )


def _resume(config, ckpt, state, iterator):
    """Latest checkpoint of this run, else `checkpoint.resume_from`, else the fresh state."""
    restored = ckpt.restore_latest(state, iterator)
    if restored is not None:
        logger.info("resumed from %s step %d", ckpt.directory, ckpt.latest_step())
        return restored
    if config.checkpoint.resume_from:
        other = checkpoint_lib.open_existing(config.checkpoint.resume_from, lora_only=config.checkpoint.lora_only)
        restored = other.restore(other.latest_step(), state, iterator)
        other.close()
        return restored
    return state


def run(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    metrics_lib.quiet_library_logs()
    setup.write_run_config(config, workdir)
    mesh, rules = mesh_from_config(config), sharding_rules(config)
    tokenizer, sources, tokenizer_dir = sft_data.load_tokenizer(config, workdir)
    rng = jax.random.PRNGKey(config.seed)
    model_rng, state_rng = jax.random.split(rng)
    base_config = setup.model_config_from(config, tokenizer)
    model_config, params, mask = setup.build_params(config, base_config, mesh, rules, model_rng)
    optimizer, schedule = optimizer_from_config(config.optimizer, config.train.steps, config.model.param_dtype)
    shardings = partitioning.state_shardings(model_config, optimizer, mask, mesh, rules)
    state = partitioning.init_sharded_state(params, optimizer, state_rng, mask, shardings)
    del params
    iterator = sft_data.make_data_iterator(config, tokenizer, sources)
    ckpt = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        every=config.checkpoint.every,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
        lora_only=config.checkpoint.lora_only,
    )
    state = _resume(config, ckpt, state, iterator)
    batch_shape = (config.data.batch_size, config.data.seq_len)
    step_fn = make_sft_step(
        model_config,
        optimizer,
        schedule,
        mesh=mesh,
        state_shardings=shardings,
        rules=rules,
        loss_settings=loss_settings_from_config(config),
        microbatches=config.train.microbatches,
        batch_shape=batch_shape,
    )
    batch_shardings = partitioning.batch_shardings(mesh, rules, batch_shape)
    writer = metrics_lib.MetricWriter(workdir, total_steps=config.train.steps)
    lora = model_config.lora_rank > 0
    peak = metrics_lib.peak_flops_per_device(override=config.train.peak_flops_per_device)
    logger.info(
        "training %s params (%s trainable) on mesh %s",
        state_lib.count_params(state_lib.full_params(state)),
        state_lib.count_params(state["params"]),
        dict(mesh.shape),
    )

    step = int(jax.device_get(state["step"]))
    accumulator, final = metrics_lib.Accumulator(), {}
    window = {"tokens": 0, "flops": 0.0, "steps": 0, "start": time.perf_counter()}
    while step < config.train.steps:
        try:
            batch = next(iterator)
        except StopIteration:
            logger.warning("data ran out at step %d of %d", step, config.train.steps)
            break
        step_rng = jax.random.fold_in(state["rng"], step)
        state, step_metrics = step_fn(state, partitioning.put_batch(batch, batch_shardings), step_rng)
        step += 1
        accumulator.add(step_metrics)
        real_tokens = int((batch["segment_ids_bt"] != 0).sum())
        window["tokens"] += real_tokens
        window["flops"] += metrics_lib.step_flops(
            model_config, real_tokens, metrics_lib.attended_pairs(batch["segment_ids_bt"]), lora
        )
        window["steps"] += 1
        ckpt.maybe_save(step, state, iterator, last=step == config.train.steps)
        if step % config.train.log_every == 0 or step == config.train.steps:
            final = _log(writer, step, accumulator, window, iterator, peak)
    if window["steps"]:  # the data ran out between two log steps
        final = _log(writer, step, accumulator, window, iterator, peak)
    ckpt.maybe_save(step, state, iterator, last=True)
    ckpt.close()
    writer.close()
    if config.export.hf:
        export_dir = checkpoint_lib.export_hf(
            model_config,
            state_lib.full_params(state),
            os.path.join(workdir, "export", "hf"),
            tokenizer_dir=tokenizer_dir,
        )
        final["export_dir"] = export_dir
    final["step"] = step
    return final


def _log(writer, step, accumulator, window, iterator, peak) -> dict:
    """Averages since the last log; tokens and FLOPs are this host's, so MFU uses this host's devices and
    tokens/s is scaled by the process count (hosts read equal row counts)."""
    scalars = accumulator.compute()  # fetching the averages waits for the steps to finish
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    scalars["tokens_per_s"] = window["tokens"] * jax.process_count() / elapsed
    scalars["steps_per_s"] = window["steps"] / elapsed
    if peak:
        scalars["mfu"] = window["flops"] / elapsed / (peak * jax.local_device_count())
    scalars.update({f"data/{k}": float(v) for k, v in iterator.stats.items()})
    writer.write_scalars(step, scalars)
    window.update(tokens=0, flops=0.0, steps=0, start=time.perf_counter())
    return dict(scalars)
