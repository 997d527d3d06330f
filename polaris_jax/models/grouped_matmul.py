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
  ~ (rows + G·tile)·in·out; the weight gather is bounded (GATHER_BYTES per step, tiles in chunks beyond,
  gathered again in the backward pass).
- "auto": ragged_dot where the function is lowered for TPU, tiled elsewhere (`jax.lax.platform_dependent`
  picks at lowering, not from the host's backend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polaris_jax.models.config import MOE_MATMULS as KERNELS

GATHER_BYTES = 256 * 2**20  # the tiled kernel's per-step weight gather; beyond it, tiles go in chunks


class _RowsInPlace:
    """A layout whose rows enter and leave as they are."""

    def enter(self, x_ri):
        return x_ri

    def leave(self, y_ro):
        return y_ro


class RaggedLayout(_RowsInPlace):
    def __init__(self, group_sizes_g, rows: int):
        self.group_sizes_g = group_sizes_g

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
        w_gio = w_gio.astype(x_ri.dtype)
        x_tmi = x_ri.reshape(self.tiles, self.tile, x_ri.shape[-1])
        tile_weight_bytes = w_gio.shape[-2] * w_gio.shape[-1] * w_gio.dtype.itemsize
        chunk = max(1, GATHER_BYTES // tile_weight_bytes)
        tiles_mm = lambda x, groups: jnp.einsum("tmi,tio->tmo", x, w_gio[groups], preferred_element_type=jnp.float32)
        if chunk >= self.tiles:
            y = tiles_mm(x_tmi, self.group_t)
        else:  # bounded gathers: `chunk` tiles' weights at a time
            chunks = -(-self.tiles // chunk)
            pad = chunks * chunk - self.tiles
            x_ctmi = jnp.pad(x_tmi, ((0, pad), (0, 0), (0, 0))).reshape(chunks, chunk, self.tile, -1)
            group_ct = jnp.pad(self.group_t, (0, pad)).reshape(chunks, chunk)
            # Rematerialised: the backward gathers each chunk's weights again rather than keeping every chunk's
            # (all tiles' weights, [tiles, in, out], the bound undone: 3.2 GiB per matmul at Qwen3-30B-A3B, 2K).
            body = jax.checkpoint(lambda args: tiles_mm(*args))
            y = jax.lax.map(body, (x_ctmi, group_ct)).reshape(chunks * chunk, self.tile, -1)
            y = y[: self.tiles]
        return y.reshape(self.tiles * self.tile, -1).astype(x_ri.dtype)


class CapacityLayout(_RowsInPlace):
    """Rows already laid out as G groups of `capacity` slots each (GShard's capacity-factor dispatch):
    one batched matmul straight against the [G, in, out] weights, no gather and no padding beyond the
    empty slots."""

    def __init__(self, groups: int):
        self.groups = groups

    def matmul(self, x_ri, w_gio):
        x_gci = x_ri.reshape(self.groups, -1, x_ri.shape[-1])
        y = jnp.einsum("gci,gio->gco", x_gci, w_gio.astype(x_ri.dtype), preferred_element_type=jnp.float32)
        return y.reshape(x_ri.shape[0], -1).astype(x_ri.dtype)


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
