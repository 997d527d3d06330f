"""The engine's own mesh, and the one resharding transfer that moves the learner's weights onto it.

Training keeps its FSDP/TP mesh (`config.mesh`). The rollout engine runs on `rollout.mesh` (axis sizes
like `mesh`; empty = the training mesh itself), either over the same devices (`rollout.devices =
"shared"`) or over devices of its own (`"disjoint"`: the engine takes the last prod(rollout.mesh)
devices, training the rest). After each update the weights move once, whole arrays resharded by
`jax.device_put` (disjoint) or a jitted copy with the engine's out_shardings (shared): the engine
never all-gathers weights per token. With LoRA only the adapters move after the first push; each push's
time and bytes go to the step's metrics (`ParamsMover.last`).

    train_mesh, engine_mesh = meshes(config)
    to_engine = ParamsMover(model_config, engine_mesh, rules)
    engine.update_params(to_engine(params), version)

On several processes the streaming loop (k >= 1 on the engine) runs one engine replica per process over
its local devices (`engine_replicas(config)`; `rollout.mesh` then sizes each replica, empty: data-parallel
over the process's devices); `replicas.py` moves the weights and shares the rollouts.

`check_rollout_section(config)` refuses a bad section before anything is built, naming the key.
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np

from polaris_jax.models.config import ConfigError
from polaris_jax.models.sharding import MESH_AXES, make_mesh, mesh_from_config, param_shardings

DEVICES = ("shared", "disjoint")
SYNC_METRICS = ("engine/weight_sync_s", "engine/weight_sync_bytes", "engine/weight_sync_device_bytes_max")


def _axis_sizes(section, key: str) -> dict[str, int]:
    sizes = {}
    for axis, size in dict(section).items():
        if axis not in MESH_AXES:
            raise ConfigError(f"{key}: axis {axis!r} is not one of {MESH_AXES}")
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(f"{key}.{axis}={size!r} must be an integer >= 1, or -1 for the remaining devices")
        sizes[axis] = size
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"{key}: at most one axis may be -1")
    return sizes


def _fits(sizes: dict[str, int], devices: int) -> bool:
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    return devices % known == 0 if -1 in sizes.values() else known == devices


def engine_replicas(config) -> bool:
    """Whether this run streams rollouts through one engine per process (several processes, k >= 1 on the
    engine): each process's background thread then runs only programs on its own devices."""
    r = config.rollout
    return jax.process_count() > 1 and r.backend == "engine" and r.max_staleness >= 1


def process_devices(index: int) -> list:
    """Process `index`'s devices in id order (a replica's local mesh, as every process lays it out)."""
    return sorted((d for d in jax.devices() if d.process_index == index), key=lambda d: d.id)


def check_rollout_section(config, device_count: int | None = None) -> None:
    """Raises ConfigError naming the key for a rollout mesh that cannot be built on these devices, and
    for staleness / in-flight / partial-rollout settings that contradict each other."""
    r = config.rollout
    devices = jax.device_count() if device_count is None else device_count
    if r.devices not in DEVICES:
        raise ConfigError(f"rollout.devices={r.devices!r} must be one of {DEVICES}")
    sizes = _axis_sizes(r.mesh, "rollout.mesh")
    train = _axis_sizes(config.mesh, "mesh")
    if r.devices == "disjoint":
        if jax.process_count() > 1:
            raise ConfigError("rollout.devices='disjoint' is for one process; multi-process runs share devices")
        if not sizes or -1 in sizes.values():
            raise ConfigError("rollout.devices='disjoint' needs rollout.mesh with every axis size given (no -1)")
        own = int(np.prod(list(sizes.values())))
        if own >= devices:
            raise ConfigError(
                f"rollout.mesh {sizes} takes {own} of {devices} devices, leaving none for training (rollout.devices)"
            )
        if not _fits(train, devices - own):
            raise ConfigError(f"mesh {train} does not fit the {devices - own} devices rollout.mesh {sizes} leaves")
    elif engine_replicas(config):
        _check_replicas(config, sizes, devices)
    elif sizes and not _fits(sizes, devices):
        raise ConfigError(f"rollout.mesh {sizes} does not divide the {devices} devices")
    if (r.mesh or r.devices == "disjoint") and r.backend != "engine":
        raise ConfigError("rollout.mesh and rollout.devices need rollout.backend='engine'")
    if not (r.length_spread == 0 or r.length_spread >= 1):
        raise ConfigError(f"rollout.length_spread={r.length_spread!r} must be 0 (off) or >= 1")
    in_flight, per_step = r.max_prompts_in_flight, r.prompts_per_step
    if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < per_step:
        raise ConfigError(
            f"rollout.max_prompts_in_flight={in_flight!r} must be an integer >= rollout.prompts_per_step={per_step}"
        )
    cap = r.max_steps_per_response
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ConfigError(f"rollout.max_steps_per_response={cap!r} must be an integer >= 1 (1: no partial rollouts)")
    streaming = in_flight > per_step or cap > 1
    if streaming and r.backend != "engine":
        raise ConfigError(
            "rollout.max_prompts_in_flight > prompts_per_step and rollout.max_steps_per_response > 1 stream "
            "rollouts through the engine: they need rollout.backend='engine'"
        )
    if streaming and r.max_staleness < 1:
        raise ConfigError(
            "rollout.max_prompts_in_flight > prompts_per_step and rollout.max_steps_per_response > 1 need "
            "rollout.max_staleness >= 1 (0 is the synchronous loop: one batch, sampled whole by one version)"
        )
    if r.max_staleness >= 1 and r.backend == "static" and jax.process_count() > 1:
        raise ConfigError(
            "rollout.backend='static' with rollout.max_staleness >= 1 samples on the training mesh from a "
            f"background thread, whose collectives would interleave with the learner's on {jax.process_count()} "
            "processes: use rollout.backend='engine' (one engine replica per process)"
        )
    if cap - 1 > r.max_staleness:
        raise ConfigError(
            f"rollout.max_steps_per_response={cap} lets a response span {cap} weight versions, so "
            f"rollout.max_staleness={r.max_staleness} must be >= {cap - 1}"
        )


def _check_replicas(config, sizes: dict[str, int], devices: int) -> None:
    """One engine replica per process: each process's devices must hold `rollout.mesh`, and each step's
    prompts must split evenly over the processes."""
    r, processes = config.rollout, jax.process_count()
    counts = {len(process_devices(p)) for p in range(processes)}
    if len(counts) > 1:
        raise ConfigError(f"rollout.max_staleness >= 1 runs an engine per process; the processes hold {counts} devices")
    local = devices // processes
    if sizes and not _fits(sizes, local):
        raise ConfigError(
            f"rollout.mesh {sizes} does not divide the {local} devices of each process (with rollout.max_staleness "
            f">= 1 on {processes} processes, each process runs its own engine replica)"
        )
    if r.prompts_per_step % processes:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} must split evenly over the {processes} processes' "
            "engine replicas (rollout.max_staleness >= 1)"
        )


def meshes(config):
    """(training mesh, engine mesh) as `rollout.mesh` and `rollout.devices` ask (see the module docstring);
    with engine replicas, the engine mesh is over this process's devices."""
    r = config.rollout
    rollout_shape = {a: int(r.mesh[a]) for a in MESH_AXES if a in r.mesh}
    devices = jax.devices()
    if engine_replicas(config):
        local = process_devices(jax.process_index())
        return mesh_from_config(config, devices), make_mesh(rollout_shape or {"data": len(local)}, local)
    if r.devices == "disjoint":
        own = int(np.prod(list(rollout_shape.values())))
        return mesh_from_config(config, devices[: len(devices) - own]), make_mesh(rollout_shape, devices[-own:])
    train_mesh = mesh_from_config(config, devices)
    return train_mesh, (make_mesh(rollout_shape, devices) if rollout_shape else train_mesh)


class ParamsMover:
    """`mover(params)`: a fresh copy of the learner's params laid out for the engine's mesh (one transfer;
    fresh buffers, since the update donates the learner's). Each array moves shard to shard into the engine's
    layout, so experts split over an `expert` axis are never gathered on one device.

    With a `trainable_mask` (LoRA), the frozen base moves once, on the first call, and later calls move only
    the trainable leaves (the adapters) beside the cached base. `last` holds the latest push's
    `engine/weight_sync_s`, `engine/weight_sync_bytes` (arrays moved, logical bytes) and
    `engine/weight_sync_device_bytes_max` (the most bytes any one engine device received)."""

    def __init__(self, model_config, mesh, rules, trainable_mask=None):
        self.shardings = param_shardings(model_config, mesh, rules)
        self.mesh = mesh
        self.trainable_mask = trainable_mask
        self._copies: dict[tuple, object] = {}  # jitted copies by the leaves they move (all, then the trainable)
        self._cached: list | None = None  # the engine-side leaves of the last push (frozen ones are reused)
        self.last = dict.fromkeys(SYNC_METRICS, 0.0)

    def _move(self, index, leaves, shardings):
        engine_devices = set(self.mesh.devices.flat)
        if all(set(x.sharding.device_set) <= engine_devices for x in leaves if isinstance(x, jax.Array)):
            if index not in self._copies:
                self._copies[index] = jax.jit(lambda xs: [jnp.copy(x) for x in xs], out_shardings=shardings)
            return self._copies[index](leaves)
        return jax.device_put(leaves, shardings)

    def __call__(self, params):
        start = time.perf_counter()
        leaves, treedef = jax.tree.flatten(params)
        shardings = treedef.flatten_up_to(self.shardings)
        mask = [True] * len(leaves) if self.trainable_mask is None else treedef.flatten_up_to(self.trainable_mask)
        index = [i for i, trainable in enumerate(mask) if trainable or self._cached is None]
        moved = self._move(tuple(index), [leaves[i] for i in index], [shardings[i] for i in index])
        out = list(self._cached) if self._cached is not None else [None] * len(leaves)
        for i, x in zip(index, moved):
            out[i] = x
        jax.block_until_ready(moved)
        if self.trainable_mask is not None:
            self._cached = out
        received = collections.Counter()
        for x in moved:
            for shard in x.addressable_shards:
                received[shard.device.id] += shard.data.nbytes
        self.last = {
            "engine/weight_sync_s": time.perf_counter() - start,
            "engine/weight_sync_bytes": float(sum(x.nbytes for x in moved)),
            "engine/weight_sync_device_bytes_max": float(max(received.values(), default=0)),
        }
        return jax.tree.unflatten(treedef, out)
