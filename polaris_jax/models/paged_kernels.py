"""Pallas paged-attention kernels by platform, each checked against the plain-JAX reference
(`paged_attention.paged_attention`, which CPU and every shape no kernel takes run).

`attend_by_platform` stages the reference and every kernel that fits the shapes with
`jax.lax.platform_dependent`, so the branch is picked by the platform being lowered for (cuda: "gpu",
tpu: "tpu", anything else: the reference), never by the Python process's default backend.

Kernels (`KERNELS`, a `Registry`; each entry declares its `platforms` and an `unfit` check):
- "gpu": `jax.experimental.pallas.ops.gpu.paged_attention` (Pallas Triton). Loads must be powers of two,
  so head_dim, page_size and the compute block (pages x page_size >= 16 tokens, Triton's smallest dot)
  are; query heads per kv head are padded by the kernel to `block_h` = 16.
- "tpu": `jax.experimental.pallas.ops.tpu.paged_attention` (Mosaic). head_dim a multiple of 128 (lanes),
  page_size of 16 (a bf16 sublane tile). It casts K and V to bfloat16 after the DMA, even float32 pages.

- "cpu": `models.cpu_gemm.paged_decode`, a C++ FFI kernel (`cpu_paged.cc`) that reads each row's pages in
  place through its table (no gathered copy), float32 pages. Not staged by "auto" (an FFI call is not split
  over a mesh, so SPMD would gather the pool onto every device): the engine names it when it runs on one CPU
  device (`decode_kernel`).

All three are decode kernels: one query token per row (t == 1) that sees a row's first `length` positions.
Our call maps onto theirs as follows: the length is min(lengths_b, position + 1), clipped to the table
(so a padding row, position -1, has length 0 and gets zeros, which we also force: the kernels' own
zero for an empty row is an accident of their initialisation); the scale is folded into q (the kernels
take none); the table is padded with the null page to a whole number of compute blocks (past every
row's length, so masked, and skipped past the block that holds it). t > 1 (a chunk of a chunked
prefill) and shapes a kernel does not take fall back to the reference for that platform.

`interpret=True` on a kernel runs it in Pallas interpret mode (the TPU one under
`force_tpu_interpret_mode`), which is how the tests run both on CPU.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged
from jax.experimental.pallas.ops.tpu import paged_attention as tpu_paged

from polaris_jax.models import cpu_gemm
from polaris_jax.models import paged_attention as reference
from polaris_jax.models.config import ConfigError
from polaris_jax.registry import Registry

KERNELS = Registry("paged attention kernel", inputs=6)
GPU_BLOCK_H = 16  # the kernel's minimum (a multiple of 16); more query heads per kv head run as more blocks
GPU_BLOCK_TOKENS = 128  # tokens per compute block, as the kernel's defaults (8 pages of 16)
GPU_MAX_SPLITS = 16  # the kernel's default k_splits: a long table is split over this many programs
TPU_BLOCK_TOKENS = 512  # as JAX's own tests of the TPU kernel


def kernel_names() -> list[str]:
    return KERNELS.names()


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _common_unfit(q_bthd, k_pages_kpsd, v_pages_kpsd) -> str:
    if q_bthd.shape[1] != 1:
        return f"t={q_bthd.shape[1]}: decode kernels take one query token per row"
    if q_bthd.shape[2] % k_pages_kpsd.shape[0]:
        return f"{q_bthd.shape[2]} query heads are not a multiple of {k_pages_kpsd.shape[0]} kv heads"
    if k_pages_kpsd.shape != v_pages_kpsd.shape or k_pages_kpsd.dtype != v_pages_kpsd.dtype:
        return "k and v pages differ in shape or dtype"
    if not jnp.issubdtype(k_pages_kpsd.dtype, jnp.floating):
        return f"{k_pages_kpsd.dtype} pages (quantised pages are not wired)"
    return ""


def _gpu_unfit(q_bthd, k_pages_kpsd, v_pages_kpsd) -> str:
    _, _, page_size, head_dim = k_pages_kpsd.shape
    if reason := _common_unfit(q_bthd, k_pages_kpsd, v_pages_kpsd):
        return reason
    if not (_pow2(head_dim) and head_dim >= 16):
        return f"head_dim={head_dim}: Triton wants a power of two >= 16"
    if not _pow2(page_size):
        return f"page_size={page_size}: Triton wants a power of two"
    return ""


def _tpu_unfit(q_bthd, k_pages_kpsd, v_pages_kpsd) -> str:
    _, _, page_size, head_dim = k_pages_kpsd.shape
    if reason := _common_unfit(q_bthd, k_pages_kpsd, v_pages_kpsd):
        return reason
    if head_dim % 128:
        return f"head_dim={head_dim}: Mosaic wants a multiple of 128 lanes"
    if page_size % 16:
        return f"page_size={page_size}: Mosaic wants a multiple of 16 sublanes (bf16 tile)"
    return ""


def _decode_inputs(q_bthd, page_table_bp, lengths_b, query_positions_bt, *, scale, q_dtype, page_size, block_pages):
    """(q_bhd scaled, the table padded with null pages to a multiple of block_pages, int32 visible length per row)."""
    q_bhd = (q_bthd[:, 0].astype(jnp.float32) * scale).astype(q_dtype)
    pad = -page_table_bp.shape[1] % block_pages
    table_bp = jnp.pad(page_table_bp.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=reference.NULL_PAGE)
    visible_b = jnp.minimum(lengths_b, query_positions_bt[:, 0] + 1)
    return q_bhd, table_bp, jnp.clip(visible_b, 0, page_table_bp.shape[1] * page_size).astype(jnp.int32)


def _finish(out_bhd, visible_b, q_bthd):
    """[b, 1, h, d] in q's dtype, zeros for a row that sees nothing."""
    out_bhd = jnp.where(visible_b[:, None, None] > 0, out_bhd, 0)
    return out_bhd[:, None].astype(q_bthd.dtype)


def _cpu_unfit(q_bthd, k_pages_kpsd, v_pages_kpsd) -> str:
    kv_heads, _, page_size, head_dim = k_pages_kpsd.shape
    if reason := _common_unfit(q_bthd, k_pages_kpsd, v_pages_kpsd):
        return reason
    if k_pages_kpsd.dtype != jnp.float32:
        return f"{k_pages_kpsd.dtype} pages: the CPU kernel reads float32 pages"
    group, limits = q_bthd.shape[2] // kv_heads, cpu_gemm.PAGED_LIMITS
    if group > limits["group"] or group * head_dim > limits["group_dims"] or page_size > limits["page_size"]:
        return f"{group} query heads per kv head x head_dim {head_dim}, page_size {page_size}: beyond {limits}"
    if not cpu_gemm.available():
        return "the CPU kernel needs the CPU backend and a C++ compiler for models/cpu_paged.cc"
    return ""


@KERNELS.register("gpu", platforms=("cuda",), unfit=_gpu_unfit)
def gpu_kernel(
    q_bthd, k_pages_kpsd, v_pages_kpsd, page_table_bp, lengths_b, query_positions_bt, *, scale, interpret=False
):
    page_size = k_pages_kpsd.shape[2]
    block_pages = max(1, GPU_BLOCK_TOKENS // page_size)
    splits = max(1, min(GPU_MAX_SPLITS, -(-page_table_bp.shape[1] // block_pages)))
    # Triton's dot takes one dtype, so q goes to the pages' dtype (float32 pages: TF32 at DEFAULT precision).
    q_bhd, table_bp, visible_b = _decode_inputs(
        q_bthd,
        page_table_bp,
        lengths_b,
        query_positions_bt,
        scale=scale,
        q_dtype=k_pages_kpsd.dtype,
        page_size=page_size,
        block_pages=splits * block_pages,
    )
    out_bhd = gpu_paged.paged_attention(
        q_bhd,
        k_pages_kpsd,
        v_pages_kpsd,
        table_bp,
        visible_b,
        block_h=GPU_BLOCK_H,
        pages_per_compute_block=block_pages,
        k_splits=splits,
        interpret=interpret,
    )
    return _finish(out_bhd, visible_b, q_bthd)


@KERNELS.register("tpu", platforms=("tpu",), unfit=_tpu_unfit)
def tpu_kernel(
    q_bthd, k_pages_kpsd, v_pages_kpsd, page_table_bp, lengths_b, query_positions_bt, *, scale, interpret=False
):
    page_size = k_pages_kpsd.shape[2]
    block_pages = max(1, TPU_BLOCK_TOKENS // page_size)
    # q stays float32: the kernel computes in float32 (and widens q to it anyway unless heads per kv head % 8 == 0).
    q_bhd, table_bp, visible_b = _decode_inputs(
        q_bthd,
        page_table_bp,
        lengths_b,
        query_positions_bt,
        scale=scale,
        q_dtype=jnp.float32,
        page_size=page_size,
        block_pages=block_pages,
    )
    mode = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
    with mode:
        out_bhd = tpu_paged.paged_attention(
            q_bhd, k_pages_kpsd, v_pages_kpsd, visible_b, table_bp, pages_per_compute_block=block_pages
        )
    return _finish(out_bhd, visible_b, q_bthd)


@KERNELS.register("cpu", platforms=("cpu",), unfit=_cpu_unfit, auto=False)
def cpu_kernel(q_bthd, k_pages_kpsd, v_pages_kpsd, page_table_bp, lengths_b, query_positions_bt, *, scale):
    rows = (q_bthd, page_table_bp, lengths_b, query_positions_bt)
    page_size = k_pages_kpsd.shape[2]  # one page a block: the kernel reads each row's pages through its table
    q_bhd, table_bp, visible_b = _decode_inputs(
        *rows, scale=scale, q_dtype=jnp.float32, page_size=page_size, block_pages=1
    )
    return _finish(cpu_gemm.paged_decode(q_bhd, k_pages_kpsd, v_pages_kpsd, table_bp, visible_b), visible_b, q_bthd)


def branches(q_bthd, k_pages_kpsd, v_pages_kpsd, *, scale) -> dict:
    """platform -> the kernel call staged for it ("auto"): only kernels whose `unfit` finds nothing to object to."""
    out = {}
    for name in KERNELS.names():
        meta = KERNELS.meta(name)
        if meta.get("auto", True) and not meta["unfit"](q_bthd, k_pages_kpsd, v_pages_kpsd):
            out.update({platform: functools.partial(KERNELS.get(name), scale=scale) for platform in meta["platforms"]})
    return out


def check_kernel(impl: str, platform: str | None, q_bthd, k_pages_kpsd, v_pages_kpsd) -> None:
    """A ConfigError when the named kernel `impl` ("gpu" | "tpu") cannot run on `platform` (a jax backend name;
    None: any) or does not take these shapes (ShapeDtypeStructs will do); auto and xla always pass."""
    if impl in ("auto", "xla"):
        return
    platforms = KERNELS.meta(impl)["platforms"] + (("gpu",) if impl == "gpu" else ())
    if platform is not None and platform not in platforms:
        raise ConfigError(f"paged attention kernel {impl!r} runs on {platforms[0]} only, not on {platform}")
    if reason := KERNELS.meta(impl)["unfit"](q_bthd, k_pages_kpsd, v_pages_kpsd):
        raise ConfigError(f"paged attention kernel {impl!r} does not take these shapes: {reason}")


def decode_kernel(impl: str, platform: str, devices: int, config, num_pages: int, page_size: int, kv_dtype) -> str:
    """The engine's decode kernel (one query token per row against its pool of pages) over `devices` devices of
    `platform`: a named kernel that cannot run here is a ConfigError (before any compile); "auto" on one CPU
    device becomes "cpu" where that kernel takes the shapes."""
    q, kv = _decode_shapes(config, num_pages, page_size, kv_dtype)
    check_kernel(impl, platform, q, kv, kv)
    if impl == "auto" and platform == "cpu" and devices == 1 and not _cpu_unfit(q, kv, kv):
        return "cpu"
    return impl


def _decode_shapes(config, num_pages: int, page_size: int, kv_dtype):
    """(q, pages) of an engine's decode step as ShapeDtypeStructs, for the kernels' `unfit` checks."""
    q = jax.ShapeDtypeStruct((1, 1, config.num_heads, config.head_dim), config.dtype)
    return q, jax.ShapeDtypeStruct((config.num_kv_heads, num_pages, page_size, config.head_dim), kv_dtype)


def attend_by_platform(
    q_bthd, k_pages_kpsd, v_pages_kpsd, page_table_bp, lengths_b, query_positions_bt, *, scale, impl: str = "auto"
):
    """Paged attention ([b, t, h, d] in q's dtype) by `impl` (`ModelConfig.paged_attention_impl`). auto: the
    kernel for the platform being lowered for; the reference on CPU, on other platforms, and wherever no kernel
    fits (then no switch is staged at all). xla: the reference. gpu / tpu: that kernel, for decode (a chunk of
    several tokens per row takes the reference)."""
    args = (q_bthd, k_pages_kpsd, v_pages_kpsd, page_table_bp, lengths_b, query_positions_bt)
    fallback = functools.partial(reference.paged_attention, scale=scale)
    if impl == "xla" or (impl != "auto" and q_bthd.shape[1] != 1):
        return fallback(*args)
    if impl != "auto":
        check_kernel(impl, None, q_bthd, k_pages_kpsd, v_pages_kpsd)
        return KERNELS.get(impl)(*args, scale=scale)
    kernels = branches(q_bthd, k_pages_kpsd, v_pages_kpsd, scale=scale)
    if not kernels:
        return fallback(*args)
    return jax.lax.platform_dependent(*args, default=fallback, **kernels)
