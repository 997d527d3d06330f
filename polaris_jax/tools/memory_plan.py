"""Ahead-of-time memory and FLOPs plan of a train step (and a rollout decode step) over a mesh.

Nothing is allocated: the train state and batch are `jax.ShapeDtypeStruct`s carrying their
`NamedSharding`s, the SFT step from `train.sft.step.make_sft_step` is lowered and compiled for the
mesh, and XLA's own analyses are read back:

  params, optimizer state   per-device bytes of the state's shards (exact, from the shardings)
  activations               `memory_analysis().temp_size_in_bytes` of the compiled train step
  kv cache                  per-device bytes of the sampler's cache shards for rollout_batch x rollout_len
  rollout state + temp      the larger of the sampler's two programs (`sampling.decode_loop.start`,
                            then `decode` with its state donated), compiled separately as the
                            sampler runs them: arguments + unaliased outputs + temps, less params;
                            the cache is part of it
  flops                     matmul FLOPs of the compiled per-device program with scanned layers
                            counted once per layer (`hlo_flops`), XLA's own `cost_analysis()`
                            figure (which visits each loop body once), and the PaLM-convention
                            model FLOPs of `train.metrics.step_flops` for the whole step

Any mesh size works on one host: the CLI (`polaris_jax.tools.plan`) asks XLA for N fake CPU devices.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from polaris_jax.models.lora import lora_mask
from polaris_jax.models.params import param_shapes
from polaris_jax.models.sharding import DEFAULT_RULES, logical_to_spec, param_shardings
from polaris_jax.tools import hlo_flops
from polaris_jax.train import losses, partitioning
from polaris_jax.train import metrics as metrics_lib
from polaris_jax.train import state as state_lib
from polaris_jax.train.optimizer import make_optimizer
from polaris_jax.train.sft import step as sft_step

GIB = 1024**3
_CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


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


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shard, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_train_state(model_config, optimizer, mesh: Mesh, rules=DEFAULT_RULES):
    """(abstract state with shardings, its shardings, trainable mask); LoRA when model_config.lora_rank > 0."""
    shapes = param_shapes(model_config)
    mask = lora_mask(shapes) if model_config.lora_rank else jax.tree.map(lambda _: True, shapes)
    shardings = partitioning.state_shardings(model_config, optimizer, mask, mesh, rules)
    state_shapes = jax.eval_shape(
        lambda p, key: state_lib.init_state(p, optimizer, key, mask), shapes, jax.random.key(0)
    )
    return _with_shardings(state_shapes, shardings), shardings, mask


def abstract_batch(mesh: Mesh, rules, batch_size: int, seq_len: int) -> dict:
    shardings = partitioning.batch_shardings(mesh, rules, (batch_size, seq_len))
    return {
        key: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=shardings[key])
        for key in partitioning.BATCH_KEYS
    }


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per program
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    return {
        "argument": int(mem.argument_size_in_bytes),
        "output": int(mem.output_size_in_bytes),
        "alias": int(mem.alias_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes),
        "code": int(mem.generated_code_size_in_bytes),
    }


def _peak(mem: dict) -> int:
    """Bytes live while a compiled program runs: arguments, outputs not aliased onto donated inputs, temps."""
    return mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]


def plan_train_step(request: PlanRequest, mesh: Mesh, rules=DEFAULT_RULES, optimizer=None) -> dict:
    """Compiles the SFT step ahead of time and returns per-device byte counts and FLOPs.

    `optimizer` is an (optax transform, schedule) pair; by default AdamW with clipping, whose state
    (two float32 moments per trainable weight) is what the memory depends on."""
    cfg = request.model_config
    optimizer, schedule = optimizer or make_optimizer(peak_lr=1e-5, total_steps=1000, warmup_ratio=0.01)
    state, shardings, _ = abstract_train_state(cfg, optimizer, mesh, rules)
    batch = abstract_batch(mesh, rules, request.batch_size, request.seq_len)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=partitioning.replicated(mesh))
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
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    tokens = request.batch_size * request.seq_len
    pairs = request.batch_size * request.seq_len * (request.seq_len + 1) // 2
    model_flops = metrics_lib.step_flops(cfg, tokens, pairs, lora=bool(cfg.lora_rank))
    return {
        "params": per_device_bytes(state["params"]) + per_device_bytes(state["frozen"]),
        "trainable_params": per_device_bytes(state["params"]),
        "optimizer_state": per_device_bytes(state["opt_state"]),
        "batch": per_device_bytes(batch),
        "xla": _memory(compiled),
        "xla_flops_per_device": _flops(compiled),
        "matmul_flops_per_device": hlo_flops.matmul_flops(compiled.as_text()),
        "model_flops_per_step": model_flops,
        "compile_s": compile_s,
    }


def abstract_cache(model_config, mesh: Mesh, rules, batch: int, length: int) -> dict:
    """K and V of the sampler's cache as sharded ShapeDtypeStructs (batch over data axes, kv heads over tensor)."""
    cfg = model_config
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    sharding = NamedSharding(mesh, logical_to_spec(_CACHE_AXES, mesh, rules, shape))
    return {name: jax.ShapeDtypeStruct(shape, cfg.dtype, sharding=sharding) for name in ("k", "v")}


def plan_rollout(request: PlanRequest, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """Compiles the sampler's two programs as it calls them: `sampling.decode_loop.start` (prefill, which
    returns the cache) and `decode` (the loop, which takes the state donated).

    `rollout_batch` rows = rollout_batch / samples_per_prompt prompts of `rollout_prompt_len` tokens,
    decoded into a cache of `rollout_len` slots. Returns the cache's own size and, per program, the
    bytes live beside the params (arguments + outputs not aliased + temps - params)."""
    from polaris_jax.sampling import decode_loop
    from polaris_jax.sampling.sampler import DEFAULT_PREFILL_CHUNK
    from polaris_jax.sampling.strategies import SamplingSettings

    cfg, rows, n = request.model_config, request.rollout_batch, request.samples_per_prompt
    prompts, width = rows // n, request.rollout_prompt_len
    params = _with_shardings(param_shapes(cfg), param_shardings(cfg, mesh, rules))
    rep = partitioning.replicated(mesh)

    def struct(shape, dtype, axes):
        spec = logical_to_spec(axes, mesh, rules, shape) if axes else None
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec) if axes else rep)

    inputs = (
        struct((prompts, width), jnp.int32, ("batch", None)),
        struct((prompts,), jnp.int32, ("batch",)),
        struct((rows,), jnp.int32, ("batch",)),
        struct((rows,), jnp.int32, ("batch",)),
        struct((rows,), jnp.bool_, ("batch",)),
        struct((), jnp.int32, ()),
    )
    settings = SamplingSettings.create(temperature=1.0, vocab_size=cfg.vocab_size)
    criteria = decode_loop.StopCriteria(
        eos_ids=np.zeros(1, np.int32),
        stop_ql=np.full((1, 1), -1, np.int32),
        stop_len_q=np.zeros(1, np.int32),
        max_new_tokens=np.int32(request.rollout_len - width),
    )
    statics = dict(mesh=mesh, rules=rules)
    start = decode_loop.start.lower(
        cfg,
        params,
        *inputs,
        settings,
        criteria,
        cache_len=request.rollout_len,
        prefill_chunk=DEFAULT_PREFILL_CHUNK,
        **statics,
    ).compile()
    state = jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        start.out_info,
        start.output_shardings,
    )
    decode = decode_loop.decode.lower(cfg, params, state, settings, criteria, **statics).compile()
    params_bytes = per_device_bytes(params)
    live = {"start": _peak(_memory(start)) - params_bytes, "decode": _peak(_memory(decode)) - params_bytes}
    cache = abstract_cache(cfg, mesh, rules, rows, request.rollout_len)
    return {"kv_cache": per_device_bytes(cache), "live_beside_params": live}


def plan(request: PlanRequest, mesh: Mesh, rules=DEFAULT_RULES, optimizer=None) -> dict:
    """The whole plan as one flat dict of per-device numbers (bytes, FLOPs) plus a few descriptors."""
    cfg = request.model_config
    train = plan_train_step(request, mesh, rules, optimizer)
    mem = train["xla"]
    train_peak = _peak(mem)
    out = {
        "mesh": dict(mesh.shape),
        "devices": int(mesh.devices.size),
        "lora_rank": cfg.lora_rank,
        "batch_size": request.batch_size,
        "seq_len": request.seq_len,
        "microbatches": request.microbatches,
        "remat_policy": cfg.remat_policy,
        "param_dtype": cfg.param_dtype,
        "compute_dtype": cfg.compute_dtype,
        "params_bytes": train["params"],
        "trainable_params_bytes": train["trainable_params"],
        "optimizer_state_bytes": train["optimizer_state"],
        "batch_bytes": train["batch"],
        "activations_bytes": mem["temp"],
        "xla_argument_bytes": mem["argument"],
        "xla_output_bytes": mem["output"],
        "xla_alias_bytes": mem["alias"],
        "train_peak_bytes": train_peak,
        "xla_flops_per_device": train["xla_flops_per_device"],
        "matmul_flops_per_device": train["matmul_flops_per_device"],
        "model_flops_per_step": train["model_flops_per_step"],
        "compile_s": round(train["compile_s"], 1),
    }
    if request.rollout_batch:
        rollout = plan_rollout(request, mesh, rules)
        rollout_bytes = max(rollout["live_beside_params"].values())
        out.update(
            rollout_batch=request.rollout_batch,
            rollout_len=request.rollout_len,
            rollout_prompt_len=request.rollout_prompt_len,
            kv_cache_bytes=rollout["kv_cache"],
            rollout_temp_bytes=rollout_bytes,
            # The train state stays resident while the sampler runs; the cache is in the programs' bytes.
            rollout_peak_bytes=train["params"] + train["optimizer_state"] + rollout_bytes,
        )
    return out


# Device memory as the vendors publish it (GB = 1e9 bytes): H100 / H800 SXM 80 GB, H200 141 GB HBM3e,
# TPU v5p 95 GB and v6e (Trillium) 32 GB of HBM per chip.
HARDWARE_BYTES = {"h100": 80e9, "h200": 141e9, "h800": 80e9, "v5p": 95e9, "v6e": 32e9}


def fit(result: dict, hardware: str) -> dict:
    """Whether each planned peak fits one `hardware` device; where one does not, the term that overflows
    (the largest part of that peak). Adds hardware, device_memory_bytes, train_fits, train_overflow,
    and rollout_fits / rollout_overflow when a rollout was planned."""
    if hardware not in HARDWARE_BYTES:
        raise ValueError(f"hardware={hardware!r} is not one of {sorted(HARDWARE_BYTES)}")
    memory = int(HARDWARE_BYTES[hardware])
    terms = {
        "train": {
            "params": result["params_bytes"],
            "optimizer_state": result["optimizer_state_bytes"],
            "activations": result["activations_bytes"],
        },
        "rollout": {
            "params": result["params_bytes"],
            "optimizer_state": result["optimizer_state_bytes"],
            "kv_cache": result.get("kv_cache_bytes", 0),
            "rollout_temp": result.get("rollout_temp_bytes", 0) - result.get("kv_cache_bytes", 0),
        },
    }
    out = {"hardware": hardware, "device_memory_bytes": memory}
    for phase in ("train", "rollout"):
        peak = result.get(f"{phase}_peak_bytes")
        if peak is None:
            continue
        fits = peak <= memory
        out[f"{phase}_fits"] = fits
        out[f"{phase}_overflow"] = None if fits else max(terms[phase], key=terms[phase].get)
    return out


def format_bytes(num: float | None) -> str:
    if num is None:
        return "-"
    if num >= GIB / 10:
        return f"{num / GIB:.2f} GiB"
    return f"{num / 2**20:.1f} MiB" if num >= 2**20 / 10 else f"{num / 1024:.1f} KiB"


def format_flops(num: float | None) -> str:
    if num is None or num <= 0 or not math.isfinite(num):
        return "-"
    exp = int(math.floor(math.log10(num) / 3) * 3)
    prefix = {0: "", 3: "K", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E", 21: "Z"}.get(exp, f"e{exp}")
    return f"{num / 10**exp:.2f} {prefix}FLOP"


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """(label, value) rows for printing one plan."""
    rows = [
        ("mesh", ",".join(f"{k}={v}" for k, v in result["mesh"].items())),
        ("batch x seq_len", f"{result['batch_size']} x {result['seq_len']} ({result['microbatches']} microbatches)"),
        ("lora rank", str(result["lora_rank"]) if result["lora_rank"] else "full fine-tuning"),
        ("params / device", format_bytes(result["params_bytes"])),
        ("  of which trainable", format_bytes(result["trainable_params_bytes"])),
        ("optimizer state / device", format_bytes(result["optimizer_state_bytes"])),
        ("activations (XLA temp) / device", format_bytes(result["activations_bytes"])),
        ("train step peak / device", format_bytes(result["train_peak_bytes"])),
    ]
    if "kv_cache_bytes" in result:
        rows += [
            (
                f"kv cache ({result['rollout_batch']} rows x {result['rollout_len']}) / device",
                format_bytes(result["kv_cache_bytes"]),
            ),
            ("rollout state + temp (cache incl.) / device", format_bytes(result["rollout_temp_bytes"])),
            ("rollout peak (+ params, optimizer) / device", format_bytes(result["rollout_peak_bytes"])),
        ]
    if "hardware" in result:
        memory = format_bytes(result["device_memory_bytes"])
        for phase in ("train", "rollout"):
            if f"{phase}_fits" in result:
                overflow = result[f"{phase}_overflow"]
                verdict = "fits" if result[f"{phase}_fits"] else f"does not fit: {overflow} is the largest term"
                rows.append((f"{phase} peak on {result['hardware']} ({memory})", verdict))
    rows += [
        ("compiled matmul flops / device / step", format_flops(result["matmul_flops_per_device"])),
        ("  x devices", format_flops(result["matmul_flops_per_device"] * result["devices"])),
        ("model flops / step (6ND + attention)", format_flops(result["model_flops_per_step"])),
        ("XLA cost_analysis flops / device (loop bodies once)", format_flops(result["xla_flops_per_device"])),
        ("compile time", f"{result['compile_s']} s"),
    ]
    return rows
