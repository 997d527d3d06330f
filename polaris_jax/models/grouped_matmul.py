"""Grouped matmuls for MoE experts: rows sorted by group (expert), each multiplied by its group's weight.

A layout object is built once from the group sizes and then carries rows through every matmul of the
expert MLP (gate, up, down and their LoRA factors):

    layout = make_layout(kernel, group_sizes_g, rows)
    y = layout.leave(layout.matmul(layout.enter(x_ri), w_gio))

Rows past sum(group_sizes_g) belong to no group and come out zero. Kernels (`ModelConfig.moe_matmul`):
- "ragged_dot": `jax.lax.ragged_dot`, the grouped matmul XLA lowers natively on TPU (megablox-style).
  XLA:CPU expands it into one dense dot per group, masked to the group's rows, so on CPU its cost is G
  times that of the rows (64x at 64 experts: `benchmarks/moe.py`).
- "tiled": block-sparse in plain JAX, any backend: each group's rows are padded to a multiple of a tile
  and every tile is one entry of a batched matmul against its group's weight (gathered per tile). Cost
  ~ (rows + G·tile)·in·out, and a transient [tiles, in, out] weight gather.
- "auto": ragged_dot where the function is lowered for TPU, tiled elsewhere (`jax.lax.platform_dependent`
  picks at lowering, not from the host's backend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polaris_jax.models.config import MOE_MATMULS as KERNELS


class RaggedLayout:
    def __init__(self, group_sizes_g, rows: int):
        self.group_sizes_g = group_sizes_g

    def enter(self, x_ri):
        return x_ri

    def leave(self, y_ro):
        return y_ro

    def matmul(self, x_ri, w_gio):
        y = jax.lax.ragged_dot(x_ri, w_gio.astype(x_ri.dtype), self.group_sizes_g, preferred_element_type=jnp.float32)
        return y.astype(x_ri.dtype)


class TiledLayout:
    """Rows scattered into T tiles of `tile` rows, each tile holding one group's rows only."""

    def __init__(self, group_sizes_g, rows: int, tile: int | None = None):
        groups = group_sizes_g.shape[0]
        self.tile = tile or tile_size(rows, groups)
        self.tiles = -(-rows // self.tile) + groups  # sum_g ceil(n_g / tile) never exceeds this
        ends_g = jnp.cumsum(group_sizes_g)
        starts_g = ends_g - group_sizes_g
        padded_g = -(-group_sizes_g // self.tile) * self.tile
        padded_ends_g = jnp.cumsum(padded_g)
        row_r = jnp.arange(rows)
        group_r = jnp.searchsorted(ends_g, row_r, side="right")  # == groups past the last group's end
        clipped_r = jnp.minimum(group_r, groups - 1)
        slot_r = padded_ends_g[clipped_r] - padded_g[clipped_r] + row_r - starts_g[clipped_r]
        self.slot_r = jnp.where(group_r < groups, slot_r, self.tiles * self.tile)  # out of range: dropped
        first_row_t = jnp.arange(self.tiles) * self.tile
        self.group_t = jnp.minimum(jnp.searchsorted(padded_ends_g, first_row_t, side="right"), groups - 1)

    def enter(self, x_ri):
        buffer = jnp.zeros((self.tiles * self.tile, x_ri.shape[-1]), x_ri.dtype)
        return buffer.at[self.slot_r].set(x_ri, mode="drop", unique_indices=True)

    def leave(self, y_ro):
        return y_ro.at[self.slot_r].get(mode="fill", fill_value=0)

    def matmul(self, x_ri, w_gio):
        x_tmi = x_ri.reshape(self.tiles, self.tile, x_ri.shape[-1])
        w_tio = w_gio.astype(x_ri.dtype)[self.group_t]
        y = jnp.einsum("tmi,tio->tmo", x_tmi, w_tio, preferred_element_type=jnp.float32)
        return y.reshape(self.tiles * self.tile, -1).astype(x_ri.dtype)


def tile_size(rows: int, groups: int) -> int:
    """A power of two near the mean group size, in [8, 128]: padding stays under half the rows on average."""
    mean = max(rows // max(groups, 1), 1)
    return int(min(128, max(8, 1 << (mean.bit_length() - 1))))


def make_layout(kernel: str, group_sizes_g, rows: int):
    if kernel not in KERNELS:
        raise ValueError(f"moe_matmul={kernel!r} is not one of {KERNELS}")
    return RaggedLayout(group_sizes_g, rows) if kernel == "ragged_dot" else TiledLayout(group_sizes_g, rows)


def run(kernel: str, fn, x_ri, group_sizes_g):
    """fn(layout, x_ri) for the kernel; "auto" resolves per lowering platform (ragged_dot on TPU)."""
    if kernel != "auto":
        return fn(make_layout(kernel, group_sizes_g, x_ri.shape[0]), x_ri)
    rows = x_ri.shape[0]
    return jax.lax.platform_dependent(
        x_ri,
        group_sizes_g,
        tpu=lambda x, g: fn(RaggedLayout(g, rows), x),
        default=lambda x, g: fn(TiledLayout(g, rows), x),
    )
