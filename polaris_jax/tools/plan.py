"""Memory planner: per-device memory and FLOPs of a config's train step on a mesh, before renting it.

    python -m polaris_jax.tools.plan --config=configs/sft_tiny.py
    python -m polaris_jax.tools.plan --config=configs/sft_tiny.py --model=qwen3_8b --mesh=fsdp=8 \
        --batch_size=8 --seq_len=4096 --lora_rank=32 --rollout_batch=64 --rollout_len=8192

The train step of `train.sft.step` is lowered and compiled for the mesh over N fake CPU devices
(N = the product of the mesh sizes), with ShapeDtypeStructs in place of weights, so an 8B model
plans on a laptop. The model, LoRA rank, batch, sequence length, microbatches, remat policy, mesh
and sharding rules come from the config; flags override them. `--batch_size` is the global number
of rows per optimiser step. Prints a table, then one JSON line.

SFT configs (`train/sft/config.py`): rows = data.batch_size, length = data.seq_len, microbatches =
train.microbatches; no rollout unless --rollout_batch/--rollout_len are given.
GRPO configs (`train/grpo/config.py`): the update is planned as the real GRPO update
(`train.grpo.step.make_grpo_update`) at the longest stage (or `--stage=N`), over prompts_per_step x samples_per_prompt
responses of data.max_prompt_len + that stage's max_response_len tokens: packed into rows of
algo.pack_tokens when the config packs (every sequence at full length: the most rows packing needs),
in micro passes of algo.micro_tokens or algo.microbatches. The rollout is the paged engine
(rollout.backend = engine: its page pool and programs on rollout.mesh, shared or disjoint devices), or
the static sampler decoding prompts_per_step x samples_per_prompt / rollout.chunks rows.
`--hardware=h100|h200|h800|v5p|v6e` checks each peak against that device's memory: the table and the JSON
line (`train_fits`, `rollout_fits`, and `train_overflow` / `rollout_overflow`: the largest term of a peak
that does not fit) say whether it fits.
`--mesh=auto --devices=N` plans the train step on every fsdp x expert x sequence layout of N devices the
model allows and keeps the one with the smallest train-step peak (`tools/mesh_search.py`); the JSON line
gains `mesh_search` (one row per candidate: its mesh and train peak, or the error that refused it).
`--analytic` prints only the closed-form estimate (`tools/analytic_memory.py`), in seconds, without compiling.
See `docs/planner.md` for what the numbers mean and where a GPU/TPU compiler will differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config (configs/*.py[:arg]); default: the SFT defaults of train/sft/config.py.",
    lock_config=True,
)
_MESH = flags.DEFINE_string(
    "mesh",
    "",
    "Mesh sizes, e.g. 'data=2,fsdp=4,tensor=1' (default: the config's mesh); 'auto': the fsdp x expert x "
    "sequence layout of --devices with the smallest train-step peak (tools/mesh_search.py).",
)
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake devices for --mesh=auto or a -1 mesh size (default 8).")
_MODEL = flags.DEFINE_string("model", "", "A models.PRESETS name planned instead of the config's model.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", None, "LoRA rank (0 = full fine-tuning; default: the config's).")
_LORA_ALPHA = flags.DEFINE_float("lora_alpha", None, "LoRA alpha (default: the config's).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global rows per optimiser step (default: config.data.batch_size).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: config.data.seq_len).")
_MICRO = flags.DEFINE_integer(
    "microbatches", None, "Gradient accumulation passes (default: config.train.microbatches)."
)
_REMAT = flags.DEFINE_string(
    "remat", "", "Remat policy: none | full | dots | dots_no_batch | offload (default: the config's)."
)
_ATTENTION = flags.DEFINE_enum(
    "attention_impl",
    "",
    ["", "auto", "dense", "flash"],
    "Attention over many queries (default: the config's; splash and cudnn plan as blockwise).",
)
_ROLLOUT_BATCH = flags.DEFINE_integer("rollout_batch", 0, "Rows decoded together in a rollout (0 = no KV cache plan).")
_ROLLOUT_LEN = flags.DEFINE_integer("rollout_len", 0, "Prompt + response tokens the rollout cache holds.")
_ROLLOUT_PROMPT_LEN = flags.DEFINE_integer("rollout_prompt_len", None, "Prompt tokens per rollout row (default 512).")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", None, "Rollout rows sharing one prefill (default 8).")
_HARDWARE = flags.DEFINE_enum(
    "hardware",
    "",
    ["", "h100", "h200", "h800", "v5p", "v6e"],
    "Device memory to check each peak against (default: the config's `hardware`, if any).",
)
_STAGE = flags.DEFINE_integer(
    "stage", -1, "GRPO configs: the schedule stage to plan (0-based; default -1: the longest stage)."
)
_ANALYTIC = flags.DEFINE_bool(
    "analytic",
    False,
    "Only the closed-form estimate (tools/analytic_memory.py: full or offload remat, dense or dropless MoE), in "
    "about a second: nothing compiles and no rollout is planned; with --mesh=auto the search uses it too.",
)
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "text: a table and a JSON line; json: the line only.")


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; a size may be -1 (the remaining devices)."""
    from polaris_jax.models.sharding import MESH_AXES

    shape = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        if not sep or name.strip() not in MESH_AXES:
            raise app.UsageError(f"--mesh part {part!r} is not AXIS=SIZE with AXIS in {MESH_AXES}")
        try:
            shape[name.strip()] = int(size)
        except ValueError:
            raise app.UsageError(f"--mesh size {size!r} of axis {name!r} is not an integer") from None
    if not shape:
        raise app.UsageError(f"--mesh={text!r} names no axis")
    return shape


def device_count(mesh_shape: dict[str, int], requested: int) -> int:
    known = 1
    for size in mesh_shape.values():
        if size != -1:
            if size < 1:
                raise app.UsageError(f"mesh sizes must be >= 1 or -1, got {mesh_shape}")
            known *= size
    if -1 not in mesh_shape.values():
        if requested and requested != known:
            raise app.UsageError(f"--devices={requested} disagrees with the mesh {mesh_shape} ({known} devices)")
        return known
    total = requested or 8
    if total % known:
        raise app.UsageError(f"{total} devices do not fill the mesh {mesh_shape}")
    return total


def use_fake_cpu_devices(count: int) -> None:
    """Asks XLA's CPU client for `count` devices; must run before the first JAX computation."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])
    import jax

    jax.config.update("jax_platforms", "cpu")
    if jax.device_count() != count:
        raise RuntimeError(
            f"asked XLA for {count} CPU devices but got {jax.device_count()}: a JAX backend was "
            f"started before the planner could set XLA_FLAGS"
        )


def model_config_for(config, model_preset: str):
    """The ModelConfig to plan (before LoRA): a preset if given, else the config's model."""
    from polaris_jax.models.presets import preset
    from polaris_jax.train import setup
    from polaris_jax.train.sft import data as sft_data

    m = config.model
    if model_preset:
        return preset(model_preset, **setup.model_knobs(config))
    if m.init_from and not os.path.exists(os.path.join(m.init_from, "config.json")):
        raise app.UsageError(
            f"model.init_from={m.init_from!r} has no config.json here; pass --model=PRESET "
            f"to plan with that preset's shape"
        )
    tokenizer = None
    if "overrides" in m and m.overrides.get("vocab_size", None) == 0:
        # The vocabulary is the synthetic task's tokenizer's, which the run writes at start-up.
        with tempfile.TemporaryDirectory() as tmp:
            if "synthetic" in config and config.synthetic.task:
                tokenizer = sft_data.load_tokenizer(config, tmp)[0]
            elif config.get("job", "") == "demo":
                from polaris_jax.data import synthetic_arith

                tokenizer = synthetic_arith.build_tokenizer(tmp)
            else:
                raise app.UsageError(
                    "model.overrides.vocab_size=0 takes the tokenizer's size, which this config "
                    "only knows at run time; pass --model=PRESET or "
                    "--config.model.overrides.vocab_size=N"
                )
    return setup.model_config_from(config, tokenizer, platform=None)  # plans for the hardware named, not this host


def shape_defaults(config, stage_index: int = -1) -> dict:
    """PlanRequest fields implied by an SFT or GRPO config (before flags); GRPO at stage `stage_index`
    (-1: the longest)."""
    if "rollout" in config and "schedule" in config:  # the GRPO schema (jobs grpo and demo)
        from polaris_jax.sampling.engine_settings import engine_section, engine_settings_from
        from polaris_jax.train.grpo import config as grpo_config
        from polaris_jax.train.grpo import step as grpo_step

        all_stages = grpo_config.stages(config)
        if not -1 <= stage_index < len(all_stages):
            raise app.UsageError(f"--stage={stage_index}: the schedule has stages 0..{len(all_stages) - 1}")
        stage = max(all_stages, key=lambda s: s.max_response_len) if stage_index < 0 else all_stages[stage_index]
        rows = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
        length = config.data.max_prompt_len + stage.max_response_len
        fields = dict(
            batch_size=rows,
            seq_len=length,
            microbatches=config.algo.microbatches,
            loss_chunk=config.train.loss_chunk_size,
            update=grpo_step.update_settings(config, stage),
            rollout_prompt_len=config.data.max_prompt_len,
            samples_per_prompt=config.rollout.samples_per_prompt,
            offload_optimizer=bool(config.optimizer.get("offload_during_rollout", False)),
        )
        if config.rollout.get("backend", "static") == "engine":
            fields["engine"] = engine_settings_from(config.rollout.get("engine", None) or engine_section(), length)
        else:
            fields.update(rollout_batch=rows // config.rollout.chunks, rollout_len=length)
        return fields
    return dict(
        batch_size=config.data.batch_size,
        seq_len=config.data.seq_len,
        microbatches=config.train.microbatches,
        loss_chunk=config.train.loss_chunk_size,
    )


def rollout_layout(config) -> tuple[dict[str, int], bool]:
    """The engine's mesh sizes of a GRPO config (empty: the training mesh) and whether its devices are
    disjoint from training's."""
    if "rollout" not in config or "mesh" not in config.rollout:
        return {}, False
    return {k: int(v) for k, v in config.rollout.mesh.items()}, config.rollout.get("devices", "shared") == "disjoint"


def optimizer_for(config):
    """The config's AdamW (+ clipping); the schedule's length does not change memory."""
    from polaris_jax.train.optimizer import optimizer_from_config

    return optimizer_from_config(config.optimizer, total_steps=1000, param_dtype=config.model.param_dtype)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        from polaris_jax.train.sft.config import default_config

        config = default_config()
    auto_mesh = _MESH.value == "auto"
    if auto_mesh:
        mesh_shape, train_devices = {}, _DEVICES.value or 8
    else:
        mesh_shape = parse_mesh(_MESH.value) if _MESH.value else {k: int(v) for k, v in config.mesh.items()}
        train_devices = device_count(mesh_shape, _DEVICES.value)
    rollout_shape, disjoint = rollout_layout(config)
    rollout_devices = device_count(rollout_shape, 0) if disjoint else 0
    use_fake_cpu_devices(train_devices + rollout_devices)

    import jax

    from polaris_jax.models.sharding import make_mesh, sharding_rules
    from polaris_jax.tools import analytic_memory, memory_plan, mesh_search, plan_report

    model_config = model_config_for(config, _MODEL.value)
    if _REMAT.value:
        model_config = model_config.replace(remat_policy=_REMAT.value)
    if _ATTENTION.value:
        model_config = model_config.replace(attention_impl=_ATTENTION.value)
    if model_config.attention_impl in ("splash", "cudnn"):  # a device kernel does not compile for fake CPUs;
        model_config = model_config.replace(attention_impl="auto")  # blockwise holds the same O(T·block) memory
    rank = config.lora.rank if _LORA_RANK.value is None else _LORA_RANK.value
    alpha = config.lora.alpha if _LORA_ALPHA.value is None else _LORA_ALPHA.value
    if rank:
        model_config = model_config.replace(
            lora_rank=rank, lora_alpha=float(alpha), lora_targets=tuple(config.lora.targets)
        )
    fields = shape_defaults(config, _STAGE.value)
    flag_values = {
        "batch_size": _BATCH.value,
        "seq_len": _SEQ_LEN.value,
        "microbatches": _MICRO.value,
        "rollout_batch": _ROLLOUT_BATCH.value or None,
        "rollout_len": _ROLLOUT_LEN.value or None,
        "rollout_prompt_len": _ROLLOUT_PROMPT_LEN.value,
        "samples_per_prompt": _SAMPLES.value,
    }
    fields.update({k: v for k, v in flag_values.items() if v is not None})
    if fields.get("update") is not None and _SEQ_LEN.value:  # a GRPO update of other lengths
        update = fields["update"]
        response = _SEQ_LEN.value - (fields["seq_len"] - update.max_response_len)
        pack = max(update.pack_tokens, _SEQ_LEN.value) if update.pack_tokens else 0
        fields["update"] = dataclasses.replace(update, max_response_len=response, pack_tokens=pack)
    request = memory_plan.PlanRequest(model_config=model_config, **fields)
    devices = jax.devices()
    rules, optimizer = sharding_rules(config), optimizer_for(config)
    search_table = None
    train_only = dataclasses.replace(request, engine=None, rollout_batch=0, rollout_len=0)
    plan_train = memory_plan.plan_analytic if _ANALYTIC.value else memory_plan.plan
    if _ANALYTIC.value and (reason := analytic_memory.out_of_scope(model_config)):
        raise app.UsageError(reason)
    if auto_mesh:  # the train step alone on each candidate; the rollout is planned on the one kept
        peak_of = (
            lambda shape: plan_train(  # noqa: E731
                train_only, make_mesh(shape, devices[:train_devices]), rules, optimizer
            )["train_peak_bytes"]
        )
        candidates = mesh_search.candidate_meshes(train_devices, model_config)
        mesh_shape, search_table = mesh_search.search(peak_of, candidates)
    mesh = make_mesh(mesh_shape, devices[:train_devices])
    rollout_mesh = None
    if rollout_shape and request.engine is not None:
        rollout_mesh = make_mesh(rollout_shape, devices[train_devices:] if disjoint else devices[:train_devices])
    if _ANALYTIC.value:
        result = memory_plan.plan_analytic(train_only, mesh, rules, optimizer)
    else:
        result = memory_plan.plan(request, mesh, rules, optimizer, rollout_mesh=rollout_mesh)
    result["model"] = _MODEL.value or config.model.preset or config.model.init_from
    if search_table is not None:
        result["mesh_search"] = search_table
    hardware = _HARDWARE.value or config.get("hardware", "")
    if hardware:
        result.update(plan_report.fit(result, hardware))
    if _FORMAT.value == "text":
        for row in search_table or ():
            figure = plan_report.format_bytes(row["train_peak_bytes"]) if "train_peak_bytes" in row else row["error"]
            print(f"mesh candidate {row['mesh']}: train peak {figure}")
        rows = plan_report.summary_rows(result) if not _ANALYTIC.value else plan_report.analytic_rows(result)
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"{label:<{width}}  {value}")
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
