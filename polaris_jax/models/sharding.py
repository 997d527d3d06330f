"""Logical axis names -> mesh axes, through one rules table that lives in the experiment config.

A rule maps a logical name (`embed`, `heads`, `mlp`, `batch`, ...) to a mesh axis, a tuple of mesh
axes, or None. Mesh axes absent from the mesh or of size 1 are dropped, and a mesh axis is used at
most once per array, so one table serves every mesh from 1 CPU to a pod slice.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")

# FSDP over `embed`, tensor parallelism over heads / mlp / vocab, experts over `expert`, each row's tokens
# over `sequence` (context parallelism, models.context_parallel); the weights are FSDP-sharded over the
# sequence devices too, since they hold different tokens of the same rows.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "sequence"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
)


def make_mesh(shape: dict[str, int] | Sequence[tuple[str, int]], devices=None) -> Mesh:
    """A mesh from {axis: size}; one size may be -1 to take the remaining devices."""
    items = list(shape.items() if isinstance(shape, dict) else shape)
    devices = np.asarray(devices if devices is not None else jax.devices())
    known = int(np.prod([s for _, s in items if s != -1]))
    sizes = [devices.size // known if s == -1 else s for _, s in items]
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(f"mesh {dict(items)} needs {int(np.prod(sizes))} devices but {devices.size} are available")
    return Mesh(devices.reshape(sizes), tuple(name for name, _ in items))


def logical_to_spec(axes: Iterable[str | None], mesh: Mesh, rules=DEFAULT_RULES, shape=None) -> PartitionSpec:
    """PartitionSpec for one array; an axis whose size the mesh axes do not divide stays replicated."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = tuple(a for a in targets if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        if shape is not None and chosen and shape[i] % int(np.prod([mesh.shape[a] for a in chosen])):
            chosen = ()
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shard_count(mesh: Mesh, spec: PartitionSpec) -> int:
    """Into how many pieces `spec` splits an array on `mesh`."""
    return int(np.prod([mesh.shape[a] for entry in spec for a in spec_axes(entry)]))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree, mesh: Mesh, rules=DEFAULT_RULES, shapes_tree=None):
    """NamedShardings for a pytree of logical-axes tuples (and optional matching shapes)."""
    if shapes_tree is None:
        return jax.tree.map(lambda a: NamedSharding(mesh, logical_to_spec(a, mesh, rules)), axes_tree, is_leaf=_is_axes)
    return jax.tree.map(
        lambda a, s: NamedSharding(mesh, logical_to_spec(a, mesh, rules, s.shape)),
        axes_tree,
        shapes_tree,
        is_leaf=_is_axes,
    )


def param_shardings(config, mesh: Mesh, rules=DEFAULT_RULES):
    from polaris_jax.models.params import param_axes, param_shapes

    return tree_shardings(param_axes(config), mesh, rules, param_shapes(config))


def to_host(tree):
    """Every array of `tree` whole on this host, as numpy. Arrays spread over other processes' devices are
    all-gathered: a collective, so every process must fetch the same arrays in the same order."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def shard_params(params, shardings):
    return jax.tree.map(jax.device_put, params, shardings)


# Activation constraints, set around tracing (like flax's logical_axis_rules context): the model
# calls `constrain(x, axes)` on its residual stream, which is a no-op outside the context.
_ACTIVATION_CONTEXT = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
    """While tracing inside this context, `constrain` pins activations to the mesh via the rules."""
    previous = getattr(_ACTIVATION_CONTEXT, "value", None)
    _ACTIVATION_CONTEXT.value = (mesh, rules)
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.value = previous


def current_activation_mesh():
    """(mesh, rules) of the enclosing `activation_sharding`, or None outside it."""
    return getattr(_ACTIVATION_CONTEXT, "value", None)


def constrain(x, axes: tuple[str | None, ...]):
    """`with_sharding_constraint` by logical axis names; identity outside `activation_sharding`."""
    context = current_activation_mesh()
    if context is None:
        return x
    mesh, rules = context
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, mesh, rules, x.shape)))


def mesh_from_config(config, devices=None):
    """The Mesh of `config.mesh` ({axis: size}, -1 = the rest of the devices) over `devices` (default: all)."""
    shape = {axis: int(config.mesh[axis]) for axis in MESH_AXES if axis in config.mesh}
    unknown = set(config.mesh.keys()) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are not among {MESH_AXES}")
    return make_mesh(shape, devices)


def sharding_rules(config):
    """`config.sharding_rules` as a tuple of (logical axis, mesh axis or axes) pairs."""
    return tuple(
        (name, tuple(target) if isinstance(target, list) else target) for name, target in config.sharding_rules
    )
