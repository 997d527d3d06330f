"""One engine replica per process: the streaming loop (rollout.max_staleness >= 1 on the engine) on several
processes.

Each process runs its own engine over its own devices (`rollout_mesh.meshes`), fed by its own background
thread. That thread runs only programs on the process's devices, so it never interleaves collectives with
the learner's. Everything that spans processes runs on the main thread, in the same order everywhere:
- the weight push (`ReplicaParamsMover`): one resharding transfer of the learner's params onto a global
  mesh [process, *engine axes], replicated over processes; each process then wraps its own shards as
  arrays on its engine's mesh (no copy);
- the batch (`gather_groups`): process i admits the stream positions i, i + P, i + 2P, ... (its share of
  each step's prompts, `replica_position` says where it resumes), and each take gathers every process's
  groups (tokens, logprobs, versions, texts, scores) to every process, so all of them shape the same batch
  and put it on the learner's mesh. The processes' next stream positions go into the host state.

    mover = ReplicaParamsMover(model_config, engine_mesh, rules, trainable_mask=mask)
    engine.update_params(mover(params), version)
    groups, counters, positions = gather_groups(my_groups, my_counters, producer.position)
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from polaris_jax.train.grpo.rollout_mesh import ParamsMover, process_devices
from polaris_jax.train.grpo.streaming import Group


class ReplicaParamsMover(ParamsMover):
    """`mover(params)`: the learner's params whole on every process's engine mesh (`engine_mesh` is this
    process's); LoRA moves only the adapters after the first push, as `ParamsMover` does."""

    def __init__(self, model_config, engine_mesh: Mesh, rules, trainable_mask=None):
        shape = engine_mesh.devices.shape
        rows = [np.asarray(process_devices(p)).reshape(shape) for p in range(jax.process_count())]
        if not np.array_equal(rows[jax.process_index()], engine_mesh.devices):
            raise ValueError("engine_mesh must lay this process's devices out as rollout_mesh.meshes does")
        global_mesh = Mesh(np.stack(rows), ("process", *engine_mesh.axis_names))
        super().__init__(model_config, global_mesh, rules, trainable_mask)
        self.engine_mesh = engine_mesh

    def _move(self, index, leaves, shardings):
        if index not in self._copies:  # a collective on every process's devices (the main thread's turn)
            self._copies[index] = jax.jit(lambda xs: [jnp.copy(x) for x in xs], out_shardings=shardings)
        return [self._local(x) for x in self._copies[index](leaves)]

    def _local(self, x: jax.Array) -> jax.Array:
        sharding = NamedSharding(self.engine_mesh, x.sharding.spec)
        return jax.make_array_from_single_device_arrays(x.shape, sharding, [s.data for s in x.addressable_shards])


def replica_position(host, index: int, count: int) -> int:
    """Where process `index` of `count` resumes its share of the stream: its saved next position, or (a run
    saved with another process count, or before any take) the first of its positions at or after
    `host.position`."""
    if len(host.positions) == count:
        return int(host.positions[index])
    return host.position + (index - host.position) % count


def gather_groups(groups: list[Group], counters: dict, position: int) -> tuple[list[Group], dict, list[int]]:
    """Every process's taken groups (process order, then each one's completion order), the counters summed
    (`engine_s`: the slowest process's; `replicas`: how many processes gave groups), and each process's next
    stream position. A collective: every process calls it once per take. (Pickled: the bytes come only from
    this job's own processes.)"""
    payload = pickle.dumps(
        ([(g.position, g.problem, g.completions, g.texts, g.scores) for g in groups], dict(counters), int(position))
    )
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(payload)], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    all_groups, summed, positions = [], {}, []
    for row, size in zip(gathered, sizes):
        entries, their_counters, their_position = pickle.loads(row[: int(size)].tobytes())
        all_groups += [Group(*entry) for entry in entries]  # (position, problem, completions, texts, scores)
        for key, value in their_counters.items():
            summed[key] = max(summed.get(key, 0), value) if key == "engine_s" else summed.get(key, 0) + value
        positions.append(their_position)
        summed["replicas"] = summed.get("replicas", 0) + bool(entries)
    return all_groups, summed, positions
