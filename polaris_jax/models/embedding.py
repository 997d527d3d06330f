"""The token embedding lookup under a mesh, without gathering the table.

The table [V, D] is FSDP-sharded along `embed` (D over the fsdp and sequence devices) and may be split along
`vocab` (tensor). A plain `table[tokens]` under GSPMD all-gathers the whole table on every device for the
forward pass and builds a whole-table float32 scatter for its gradient: three [V, D] float32 buffers per device
(0.6 GB each for Qwen3-0.6B, 2.5 GB for Qwen3-8B), which no FSDP or sequence split shrinks.

`lookup` instead moves the token ids, which are small: in a `shard_map`, each device gathers the ids of the
devices that share its embedding slice, looks up its own D slice of each (vocab shards mask ids outside their
range and sum over the vocab axes), and sends every row's slices back to the row's device with one
all-to-all per embedding axis (an all-gather along D for an axis that does not split the tokens). The
gradient is the same collectives reversed and a scatter into the local [V / vocab shards, D / embed shards]
slice. Outside a mesh context it is the plain lookup.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from polaris_jax.models.sharding import current_activation_mesh, logical_to_spec, spec_axes


def lookup(table_vd, tokens_bt, dtype):
    """`table_vd[tokens_bt]` as [B, T, D] in `dtype`, sharded like the residual stream under the activation
    mesh (models.sharding.activation_sharding)."""
    context = current_activation_mesh()
    if context is None:
        return table_vd[tokens_bt].astype(dtype)
    mesh, rules = context
    table_spec = logical_to_spec(("vocab", "embed"), mesh, rules, table_vd.shape)
    token_spec = logical_to_spec(("batch", "length"), mesh, rules, tokens_bt.shape)
    out_spec = PartitionSpec(*token_spec, None)
    fn = jax.shard_map(
        functools.partial(_local_lookup, table_spec, token_spec),
        mesh=mesh,
        in_specs=(table_spec, token_spec),
        out_specs=out_spec,
        check_vma=False,
    )
    return fn(table_vd.astype(dtype), tokens_bt)


def _local_lookup(table_spec, token_spec, table_vd, tokens_bt):
    vocab_axes, embed_axes = spec_axes(table_spec[0]), spec_axes(table_spec[1])
    token_dim = {axis: dim for dim, entry in enumerate(token_spec) for axis in spec_axes(entry)}
    for axis in embed_axes:  # the ids of every device holding other D slices of the same rows
        if axis in token_dim:
            tokens_bt = jax.lax.all_gather(tokens_bt, axis, axis=token_dim[axis], tiled=True)
    if vocab_axes:
        rows = table_vd.shape[0]
        first = jax.lax.axis_index(vocab_axes) * rows
        local_bt = tokens_bt - first
        inside_bt = (local_bt >= 0) & (local_bt < rows)
        x_btd = jnp.where(inside_bt[..., None], table_vd[jnp.clip(local_bt, 0, rows - 1)], 0)
        x_btd = jax.lax.psum(x_btd, vocab_axes)
    else:
        x_btd = table_vd[tokens_bt]
    # D is split major-to-minor over embed_axes: undo the minor axis first so the slices concatenate in order.
    for axis in reversed(embed_axes):
        if axis in token_dim:
            x_btd = jax.lax.all_to_all(x_btd, axis, split_axis=token_dim[axis], concat_axis=2, tiled=True)
        else:
            x_btd = jax.lax.all_gather(x_btd, axis, axis=2, tiled=True)
    return x_btd
