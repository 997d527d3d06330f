"""Per-device bytes of sharded abstract arrays and of compiled programs (XLA's memory analysis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shard, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per program
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    return {
        "argument": int(mem.argument_size_in_bytes),
        "output": int(mem.output_size_in_bytes),
        "alias": int(mem.alias_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes),
        "code": int(mem.generated_code_size_in_bytes),
    }


def peak(mem: dict) -> int:
    """Bytes live while a compiled program runs: arguments, outputs not aliased onto donated inputs, temps."""
    return mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]


def host_offloaded_bytes(closed_jaxpr) -> int:
    """Global bytes a traced program keeps in host memory across its scans: the outputs of `scan`s placed in
    host memory, i.e. the stacked residuals a remat policy offloads (remat_policy=offload). XLA on CPU
    ignores the placement, so its memory analysis counts them as device temporaries."""
    total = 0

    def walk(jaxpr):
        nonlocal total
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                for var in eqn.outvars:
                    if "host" in str(getattr(var.aval, "memory_space", "")).lower():
                        total += int(np.prod(var.aval.shape, dtype=np.int64)) * jnp.dtype(var.aval.dtype).itemsize
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(closed_jaxpr.jaxpr)
    return total
