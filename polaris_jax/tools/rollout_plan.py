"""The rollout's memory for a `memory_plan.PlanRequest`, compiled ahead of time on fake devices: the static
sampler's programs over a cache of rollout_batch x rollout_len, or the paged engine's programs over its
whole page pool."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from polaris_jax.models.params import param_shapes
from polaris_jax.models.sharding import DEFAULT_RULES, logical_to_spec, param_shardings
from polaris_jax.tools.compiled_memory import memory, peak, per_device_bytes, with_shardings
from polaris_jax.train import partitioning

_CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


def abstract_cache(model_config, mesh: Mesh, rules, batch: int, length: int) -> dict:
    """K and V of the sampler's cache as sharded ShapeDtypeStructs (batch over data axes, kv heads over tensor)."""
    cfg = model_config
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    sharding = NamedSharding(mesh, logical_to_spec(_CACHE_AXES, mesh, rules, shape))
    return {name: jax.ShapeDtypeStruct(shape, cfg.dtype, sharding=sharding) for name in ("k", "v")}


def plan_rollout(request, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
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
    params = with_shardings(param_shapes(cfg), param_shardings(cfg, mesh, rules))
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
    live = {"start": peak(memory(start)) - params_bytes, "decode": peak(memory(decode)) - params_bytes}
    cache = abstract_cache(cfg, mesh, rules, rows, request.rollout_len)
    return {"kv_cache": per_device_bytes(cache), "live_beside_params": live}


def plan_engine(request, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """Compiles the paged engine's two device programs (`sampling.engine_steps.prefill` of one chunk and
    `decode` of one block at the largest slot bucket) on `mesh`, with its whole page pool as their donated
    argument. Returns the pool's bytes per device and each program's bytes live beside the params."""
    from polaris_jax.models.paged_attention import init_kv_pages
    from polaris_jax.sampling import engine_steps
    from polaris_jax.sampling.sampler import batch_shards
    from polaris_jax.sampling.strategies import RowSettings

    cfg, settings = request.model_config, request.engine
    params = with_shardings(param_shapes(cfg), param_shardings(cfg, mesh, rules))
    # The compute dtype, as on a GPU or TPU (the engine keeps a bf16 model's pages in float32 on CPU only).
    pages = jax.eval_shape(lambda: init_kv_pages(cfg, settings.num_pages, settings.page_size, cfg.dtype))
    pages = with_shardings(pages, engine_steps.page_shardings(pages, mesh, rules))
    width = -(-settings.max_seq_len // settings.page_size)
    rows = max(settings.buckets(batch_shards(mesh, rules)))

    def on_rows(x):
        x = np.asarray(x)
        spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), mesh, rules, x.shape)
        dtype = jax.dtypes.canonicalize_dtype(x.dtype)
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=NamedSharding(mesh, spec))

    ints = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    batch = engine_steps.DecodeBatch(
        *(ints(rows) for _ in range(2)),
        ints(rows, width),
        *(ints(rows) for _ in range(4)),
        ints(rows, settings.max_eos_ids),
        RowSettings.stack([], rows),
    )
    statics = dict(mesh=mesh, rules=rules, record=settings.record_experts)
    decode = engine_steps.decode.lower(
        cfg, params, pages, jax.tree.map(on_rows, batch), block=settings.decode_block, **statics
    ).compile()
    chunk = settings.prefill_chunk
    prefill_inputs = map(on_rows, (ints(chunk), ints(chunk), ints(chunk, width)))
    prefill = engine_steps.prefill.lower(cfg, params, pages, *prefill_inputs, **statics).compile()
    params_bytes = per_device_bytes(params)
    live = {"prefill": peak(memory(prefill)) - params_bytes, "decode": peak(memory(decode)) - params_bytes}
    return {
        "kv_cache": per_device_bytes(pages),
        "params": params_bytes,
        "live_beside_params": live,
        "rows": rows,
        # What the compiled decode takes beside the params: the pool and the (small) batch of slots.
        "decode_arguments_beside_params": memory(decode)["argument"] - params_bytes,
    }
