"""Ahead-of-time memory and FLOPs plan of a train step (and a rollout decode step) over a mesh.

Nothing is allocated: the train state and batch are `jax.ShapeDtypeStruct`s carrying their
`NamedSharding`s, the train step is lowered and compiled for the mesh, and XLA's own analyses are read
back. The train step is the SFT step (`train.sft.step.make_sft_step`), or with `PlanRequest.update` the
real GRPO update (`train.grpo.step.make_grpo_update`, packed when its settings pack). The rollout is the
static sampler, or with `PlanRequest.engine` the paged engine on its own mesh (tools/rollout_plan.py):

  params, optimizer state   per-device bytes of the state's shards (exact, from the shardings)
  activations               `memory_analysis().temp_size_in_bytes` of the compiled train step, less
                            what remat_policy=offload keeps in host memory (host activations: the
                            host-placed scan outputs of the traced step; XLA:CPU ignores placements)
  kv cache                  per-device bytes of the sampler's cache shards for rollout_batch x rollout_len,
                            or of the engine's page pool
  rollout state + temp      the larger of the sampler's two programs (`sampling.decode_loop.start`,
                            then `decode` with its state donated; the engine's `prefill` and `decode`),
                            compiled separately as they run: arguments + unaliased outputs + temps,
                            less params; the cache is part of it
  flops                     matmul FLOPs of the compiled per-device program with scanned layers
                            counted once per layer (`hlo_flops`), XLA's own `cost_analysis()`
                            figure (which visits each loop body once), and the PaLM-convention
                            model FLOPs of `train.metrics.step_flops` for the whole step

Any mesh size works on one host: the CLI (`polaris_jax.tools.plan`) asks XLA for N fake CPU devices.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from polaris_jax.models.lora import lora_mask
from polaris_jax.models.params import param_shapes
from polaris_jax.models.sharding import DEFAULT_RULES, logical_to_spec, param_shardings, shard_count
from polaris_jax.sampling.sampler import batch_shards
from polaris_jax.tools import analytic_memory, hlo_flops, rollout_plan
from polaris_jax.tools.compiled_memory import (
    flops,
    host_offloaded_bytes,
    memory,
    peak,
    per_device_bytes,
    with_shardings,
)
from polaris_jax.train import losses, partitioning
from polaris_jax.train import metrics as metrics_lib
from polaris_jax.train import state as state_lib
from polaris_jax.train.optimizer import make_optimizer
from polaris_jax.train.sft import step as sft_step


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """One train step to plan: model (LoRA included in `model_config.lora_rank`), batch and mesh."""

    model_config: object
    batch_size: int  # global rows per optimiser step
    seq_len: int
    microbatches: int = 1
    loss_chunk: int = 512
    rollout_batch: int = 0  # rows decoded together; 0 = no rollout / KV cache plan
    rollout_len: int = 0  # cache slots: prompt + response tokens
    rollout_prompt_len: int = 512
    samples_per_prompt: int = 8  # rows sharing one prefill (the GRPO group)
    # GRPO: the update's settings (train.grpo.step.UpdateSettings); the train step is then the real GRPO
    # update over batch_size responses of seq_len - max_response_len prompt tokens (packed when
    # update.pack_tokens, every sequence at full length: the most rows packing can need). None = SFT.
    update: object = None
    # The paged engine's sizes (sampling.EngineSettings): the rollout is then the engine's page pool and
    # programs on the rollout mesh, not the static sampler's cache of rollout_batch x rollout_len.
    engine: object = None
    # optimizer.offload_during_rollout: the optimiser state waits in host memory while the rollout decodes.
    offload_optimizer: bool = False

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"batch_size ({self.batch_size}) must be >= 1 and seq_len ({self.seq_len}) >= 2")
        if self.microbatches < 1 or self.batch_size % self.microbatches:
            raise ValueError(f"batch_size {self.batch_size} does not split into {self.microbatches} microbatches")
        if (self.rollout_batch > 0) != (self.rollout_len > 0):
            raise ValueError("rollout_batch and rollout_len are set together (both > 0) or not at all")
        if self.rollout_batch and (
            self.rollout_batch % self.samples_per_prompt or self.rollout_len <= self.rollout_prompt_len
        ):
            raise ValueError(
                f"rollout_batch {self.rollout_batch} must be a multiple of samples_per_prompt "
                f"{self.samples_per_prompt}, and rollout_len {self.rollout_len} must exceed "
                f"rollout_prompt_len {self.rollout_prompt_len}"
            )


def abstract_train_state(model_config, optimizer, mesh: Mesh, rules=DEFAULT_RULES):
    """(abstract state with shardings, its shardings, trainable mask); LoRA when model_config.lora_rank > 0."""
    shapes = param_shapes(model_config)
    mask = lora_mask(shapes) if model_config.lora_rank else jax.tree.map(lambda _: True, shapes)
    shardings = partitioning.state_shardings(model_config, optimizer, mask, mesh, rules)
    state_shapes = jax.eval_shape(
        lambda p, key: state_lib.init_state(p, optimizer, key, mask), shapes, jax.random.key(0)
    )
    return with_shardings(state_shapes, shardings), shardings, mask


def abstract_batch(mesh: Mesh, rules, batch_size: int, seq_len: int) -> dict:
    shardings = partitioning.batch_shardings(mesh, rules, (batch_size, seq_len))
    return {
        key: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=shardings[key])
        for key in partitioning.BATCH_KEYS
    }


def plan_train_step(request: PlanRequest, mesh: Mesh, rules=DEFAULT_RULES, optimizer=None) -> dict:
    """Compiles the train step (the SFT step, or with `request.update` the GRPO update) ahead of time and
    returns per-device byte counts and FLOPs.

    `optimizer` is an (optax transform, schedule) pair; by default AdamW with clipping, whose state
    (two float32 moments per trainable weight) is what the memory depends on."""
    cfg = request.model_config
    optimizer, schedule = optimizer or make_optimizer(peak_lr=1e-5, total_steps=1000, warmup_ratio=0.01)
    state, shardings, _ = abstract_train_state(cfg, optimizer, mesh, rules)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=partitioning.replicated(mesh))
    build = _sft_step if request.update is None else _grpo_update
    step, batch, extra_args = build(request, mesh, rules, optimizer, schedule, shardings)
    start = time.perf_counter()
    traced = step.trace(state, batch, rng, *extra_args)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    # Offloaded residuals ([L, B, T, D] per layer run) are split like the residual stream's rows and tokens.
    activation_shards = shard_count(mesh, logical_to_spec(("batch", "length"), mesh, rules))
    tokens = request.batch_size * request.seq_len
    pairs = request.batch_size * request.seq_len * (request.seq_len + 1) // 2
    model_flops = metrics_lib.step_flops(cfg, tokens, pairs, lora=bool(cfg.lora_rank))
    return {
        **state_bytes(state, batch),
        "xla": memory(compiled),
        "host_activations": host_offloaded_bytes(traced.jaxpr) // activation_shards,
        "xla_flops_per_device": flops(compiled),
        "matmul_flops_per_device": hlo_flops.matmul_flops(compiled.as_text()),
        "model_flops_per_step": model_flops,
        "compile_s": compile_s,
    }


def state_bytes(state, batch) -> dict:
    """This device's shards of the abstract train state and batch (exact, from their shardings)."""
    return {
        "params": per_device_bytes(state["params"]) + per_device_bytes(state["frozen"]),
        "trainable_params": per_device_bytes(state["params"]),
        "optimizer_state": per_device_bytes(state["opt_state"]),
        "batch": per_device_bytes(batch),
    }


def plan_analytic(request: PlanRequest, mesh: Mesh, rules=DEFAULT_RULES, optimizer=None) -> dict:
    """The closed-form plan alone (tools/analytic_memory.py), in about a second: nothing is compiled and no
    rollout is planned. `train_peak_bytes` and `activations_bytes` are then the estimate's (`"estimate":
    "analytic"`). Raises ValueError outside the estimate's scope (`analytic_memory.out_of_scope`)."""
    cfg = request.model_config
    optimizer, _ = optimizer or make_optimizer(peak_lr=1e-5, total_steps=1000, warmup_ratio=0.01)
    state, _, _ = abstract_train_state(cfg, optimizer, mesh, rules)
    if request.update is None:
        batch = abstract_batch(mesh, rules, request.batch_size, request.seq_len)
    else:
        batch = abstract_update_batch(request, mesh, rules)
    exact = state_bytes(state, batch)
    estimate = analytic_memory.estimate(request, mesh, exact, rules)
    if estimate is None:
        raise ValueError(analytic_memory.out_of_scope(cfg))
    return {
        "estimate": "analytic",
        "mesh": dict(mesh.shape),
        "devices": int(mesh.devices.size),
        "lora_rank": cfg.lora_rank,
        "batch_size": request.batch_size,
        "seq_len": request.seq_len,
        "remat_policy": cfg.remat_policy,
        "params_bytes": exact["params"],
        "trainable_params_bytes": exact["trainable_params"],
        "optimizer_state_bytes": exact["optimizer_state"],
        "batch_bytes": exact["batch"],
        **{f"analytic_{k}_bytes": v for k, v in estimate.items() if k not in ("activations", "temporaries")},
        "analytic_activations_bytes": estimate["temporaries"],
        "activations_bytes": estimate["temporaries"],
        "train_peak_bytes": estimate["train_peak"],
    }


def _sft_step(request: PlanRequest, mesh, rules, optimizer, schedule, shardings):
    """(step, abstract batch, arguments after the rng) of the SFT step."""
    cfg = request.model_config
    step = sft_step.make_sft_step(
        cfg,
        optimizer,
        schedule,
        mesh=mesh,
        state_shardings=shardings,
        rules=rules,
        loss_settings=losses.LossSettings(chunk_size=request.loss_chunk),
        microbatches=request.microbatches,
        batch_shape=(request.batch_size, request.seq_len),
    )
    return step, abstract_batch(mesh, rules, request.batch_size, request.seq_len), ()


def _grpo_update(request: PlanRequest, mesh, rules, optimizer, schedule, shardings):
    """(update, abstract batch, arguments after the rng: the reference params) of the GRPO update."""
    from polaris_jax.train.grpo import step as grpo_step

    cfg = request.model_config
    update = grpo_step.make_grpo_update(
        cfg,
        optimizer,
        schedule,
        request.update,
        mesh=mesh,
        state_shardings=shardings,
        rules=rules,
        rows=request.batch_size,
    )
    ref = None
    if request.update.use_reference:
        ref = with_shardings(param_shapes(cfg), param_shardings(cfg, mesh, rules))
    return update, abstract_update_batch(request, mesh, rules), (ref,)


def abstract_update_batch(request: PlanRequest, mesh: Mesh, rules=DEFAULT_RULES):
    """The GRPO update's batch as sharded ShapeDtypeStructs: `UpdateBatch` [B, P + R], or packed
    `PackedUpdateBatch` [Mb, K, L] with K the rows of every sequence at full length (the most there can be);
    with router replay, the recorded experts of every position."""
    from polaris_jax.train.grpo import step as grpo_step
    from polaris_jax.train.grpo.packing import packed_rows

    s, rows, length, cfg = request.update, request.batch_size, request.seq_len, request.model_config
    response = s.max_response_len
    replay = s.router_replay and cfg.is_moe
    shardings = grpo_step.batch_shardings(mesh, rules, rows, packed=bool(s.pack_tokens), replay=replay)
    int32, f32 = jnp.int32, jnp.float32
    experts_lk = (cfg.num_layers_of("moe"), cfg.num_experts_per_tok) if replay else ()
    per_response = dict(mask_br=((rows, response), f32), sampler_logprobs_br=((rows, response), f32))
    per_response["advantages_b"] = ((rows,), f32)
    if s.pack_tokens:
        per_row = max(1, s.pack_tokens // length)
        needed = -(-(rows // s.minibatches) // per_row)
        k = packed_rows(needed, s.packed_row_multiple * batch_shards(mesh, rules))
        mkl = ((s.minibatches, k, s.pack_tokens), int32)
        fields = dict(tokens_mkl=mkl, positions_mkl=mkl, segment_ids_mkl=mkl, targets_mkl=mkl)
        fields.update(flat_index_br=((rows, response), int32), **per_response)
        if replay:
            fields["routed_experts_mklk"] = ((s.minibatches, k, s.pack_tokens, *experts_lk), jnp.int16)
        cls = grpo_step.PackedUpdateBatch
    else:
        bt = ((rows, length), int32)
        fields = dict(tokens_bt=bt, positions_bt=bt, segment_ids_bt=bt, response_br=((rows, response), int32))
        fields.update(per_response)
        if replay:
            fields["routed_experts_btlk"] = ((rows, length, *experts_lk), jnp.int16)
        cls = grpo_step.UpdateBatch
    structs = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=getattr(shardings, name))
        for name, (shape, dtype) in fields.items()
    }
    return cls(**structs)


def plan(request: PlanRequest, mesh: Mesh, rules=DEFAULT_RULES, optimizer=None, rollout_mesh=None) -> dict:
    """The whole plan as one flat dict of per-device numbers (bytes, FLOPs) plus a few descriptors."""
    cfg = request.model_config
    train = plan_train_step(request, mesh, rules, optimizer)
    mem = train["xla"]
    host_activations = train["host_activations"]  # XLA:CPU counts them as device temps; a GPU/TPU does not
    train_peak = peak(mem) - host_activations
    analytic = analytic_memory.estimate(request, mesh, train, rules) or {}
    # What stays on the training devices while the rollout decodes.
    rollout_optimizer = 0 if request.offload_optimizer else train["optimizer_state"]
    out = {
        "mesh": dict(mesh.shape),
        "devices": int(mesh.devices.size),
        "lora_rank": cfg.lora_rank,
        "batch_size": request.batch_size,
        "seq_len": request.seq_len,
        "microbatches": request.microbatches,
        "pack_tokens": request.update.pack_tokens if request.update is not None else 0,
        "micro_tokens": request.update.micro_rows * request.update.pack_tokens if request.update is not None else 0,
        "remat_policy": cfg.remat_policy,
        "param_dtype": cfg.param_dtype,
        "compute_dtype": cfg.compute_dtype,
        "params_bytes": train["params"],
        "trainable_params_bytes": train["trainable_params"],
        "optimizer_state_bytes": train["optimizer_state"],
        "rollout_optimizer_state_bytes": rollout_optimizer,
        "batch_bytes": train["batch"],
        "activations_bytes": mem["temp"] - host_activations,
        "host_activations_bytes": host_activations,
        "xla_argument_bytes": mem["argument"],
        "xla_output_bytes": mem["output"],
        "xla_alias_bytes": mem["alias"],
        "train_peak_bytes": train_peak,
        # The closed-form estimate (tools/analytic_memory.py; None outside its scope): XLA's temporaries hold
        # the gradients too, so analytic_activations_bytes counts them beside the activations.
        "analytic_activations_bytes": analytic.get("temporaries"),
        "analytic_train_peak_bytes": analytic.get("train_peak"),
        "xla_flops_per_device": train["xla_flops_per_device"],
        "matmul_flops_per_device": train["matmul_flops_per_device"],
        "model_flops_per_step": train["model_flops_per_step"],
        "compile_s": round(train["compile_s"], 1),
    }
    if request.engine is not None:
        # The engine on its own mesh (rollout.mesh; default the training mesh). On the training devices the
        # train state stays resident beside it, and a separate engine mesh holds its own copy of the params.
        engine_mesh = rollout_mesh or mesh
        rollout = rollout_plan.plan_engine(request, engine_mesh, rules)
        shared = set(engine_mesh.devices.flat) <= set(mesh.devices.flat)
        resident = train["params"] + rollout_optimizer if shared else 0
        own_params = rollout["params"] if engine_mesh is not mesh else 0
        rollout_bytes = max(rollout["live_beside_params"].values())
        out.update(
            rollout_mesh=dict(engine_mesh.shape),
            rollout_batch=rollout["rows"],
            rollout_len=request.engine.max_seq_len,
            engine_pages=request.engine.num_pages,
            engine_page_size=request.engine.page_size,
            kv_cache_bytes=rollout["kv_cache"],
            rollout_temp_bytes=rollout_bytes,
            engine_params_bytes=own_params,
            rollout_peak_bytes=resident + own_params + rollout_bytes,
        )
    elif request.rollout_batch:
        rollout = rollout_plan.plan_rollout(request, mesh, rules)
        rollout_bytes = max(rollout["live_beside_params"].values())
        out.update(
            rollout_batch=request.rollout_batch,
            rollout_len=request.rollout_len,
            rollout_prompt_len=request.rollout_prompt_len,
            kv_cache_bytes=rollout["kv_cache"],
            rollout_temp_bytes=rollout_bytes,
            # The train state stays resident while the sampler runs; the cache is in the programs' bytes.
            rollout_peak_bytes=train["params"] + rollout_optimizer + rollout_bytes,
        )
    return out
