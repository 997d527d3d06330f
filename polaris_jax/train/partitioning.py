"""Shardings of the train state and of batches, from the model's logical axes and the config's rules.

The state's params (and frozen part) follow `models.sharding.param_shardings`; optimiser moments
follow the parameter they belong to (via `optax.tree_utils.tree_map_params`); counters, the step and
the rng are replicated. Batches are [B, T] arrays sharded over the `batch` logical axis.
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from polaris_jax.models.params import init_params, param_shapes
from polaris_jax.models.sharding import DEFAULT_RULES, activation_sharding, logical_to_spec, param_shardings
from polaris_jax.train import state as state_lib

BATCH_KEYS = ("tokens_bt", "positions_bt", "segment_ids_bt", "targets_bt", "loss_mask_bt")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _is_none(x) -> bool:
    return x is None


def state_shardings(model_config, optimizer, trainable_mask, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """NamedShardings for every leaf of `state.init_state(params, optimizer, rng, trainable_mask)`."""
    full = param_shardings(model_config, mesh, rules)
    trainable, frozen = state_lib.partition(full, trainable_mask)
    opt_shapes = jax.eval_shape(optimizer.init, trainable_shapes(model_config, trainable_mask))
    opt = optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        opt_shapes,
        trainable,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=_is_none,
    )
    return {"params": trainable, "frozen": frozen, "opt_state": opt, "step": replicated(mesh), "rng": replicated(mesh)}


def in_memory(shardings, memory_kind: str):
    """The same shardings in another memory of the same devices ("pinned_host", "device")."""
    return jax.tree.map(lambda s: s.with_memory_kind(memory_kind), shardings)


def trainable_shapes(model_config, trainable_mask):
    """ShapeDtypeStructs of the trainable part (None where frozen); nothing is allocated."""
    return state_lib.partition(param_shapes(model_config), trainable_mask)[0]


def batch_spec(mesh: Mesh, rules=DEFAULT_RULES, shape=None, leading: int = 0) -> PartitionSpec:
    """PartitionSpec of a [..., B, T] batch array (`leading` unsharded axes first, e.g. microbatches)."""
    spec = logical_to_spec(("batch", "length"), mesh, rules, None if shape is None else shape[leading:])
    return PartitionSpec(*((None,) * leading + tuple(spec)))


def batch_shardings(mesh: Mesh, rules=DEFAULT_RULES, batch_shape=None) -> dict:
    sharding = NamedSharding(mesh, batch_spec(mesh, rules, batch_shape))
    return {key: sharding for key in BATCH_KEYS}


def init_sharded_params(model_config, rng, mesh: Mesh, rules=DEFAULT_RULES, std: float = 0.02):
    """Random parameters created directly in their shards (no host copy of the full model)."""
    shardings = param_shardings(model_config, mesh, rules)
    return jax.jit(lambda key: init_params(model_config, key, std=std), out_shardings=shardings)(rng)


def init_sharded_state(params, optimizer, rng, trainable_mask, shardings: dict) -> dict:
    """`state.init_state` with the optimiser state created in its shards; `params` should already be sharded."""
    trainable, frozen = state_lib.partition(params, trainable_mask)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(trainable)
    # jit with out_shardings (not device_put) so this also works when the mesh spans several processes.
    step, rng = jax.jit(
        lambda r: (jax.numpy.zeros((), jax.numpy.int32), r), out_shardings=(shardings["step"], shardings["rng"])
    )(rng)
    return {"params": trainable, "frozen": frozen, "opt_state": opt_state, "step": step, "rng": rng}


def put_batch(batch: dict, shardings: dict) -> dict:
    """Host numpy batch -> device arrays in their shards (single process: a plain device_put)."""
    if jax.process_count() == 1:
        return {key: jax.device_put(batch[key], shardings[key]) for key in BATCH_KEYS}
    # Multi-host: each process holds its own rows; stitch them into global arrays.
    from jax.experimental import multihost_utils

    return {
        key: multihost_utils.host_local_array_to_global_array(batch[key], shardings[key].mesh, shardings[key].spec)
        for key in BATCH_KEYS
    }


def jit_step(step_fn, *, mesh, rules, in_shardings, out_shardings, compiler_options=None):
    """The one jitted shape of the SFT and GRPO steps: `step_fn(state, ...)` traced inside
    `activation_sharding(mesh, rules)` (the model pins its residual stream to the batch sharding, so XLA
    does not all-gather activations), with explicit shardings, and the state (argument 0) donated."""

    def step(*args):
        with activation_sharding(mesh, rules):
            return step_fn(*args)

    return jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        donate_argnums=(0,),
        compiler_options=compiler_options,
    )
