"""Packed-panel matmuls for CPU decoding (an XLA FFI kernel, `cpu_gemm.cc`): float32 or bfloat16 weights.

At decode batch sizes XLA CPU's GEMM reads weights at 20-28 GB/s on our 2-core machines, against
35-40 GB/s for a plain read (BENCHMARKS.md). `pack_projections` turns the decode layout's projection
weights into `PackedWeight`s: column panels [P, K, NT], one contiguous stream each, that the kernel reads
once per block of 8 rows. `models.layers.project` and `transformer.lm_head` dispatch on the type, so the
model code is unchanged and the stacked training params never see a packed weight. `greedy_logprob` runs the
same products for the unembedding of an all-greedy decode step but reduces each row inside the kernel
(argmax and log-softmax mass per panel), so the [B, V] logits are never written (sampling/engine_steps.py).

The kernel is compiled on first use with the host's C++ compiler (`-march=native`) into
`$POLARIS_JAX_CACHE` (default ~/.cache/polaris_jax), keyed by its source, jaxlib and the CPU's flags.
Without a compiler, `available()` is False and the sampler keeps XLA's dots.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TARGETS = {jnp.dtype(jnp.float32): "polaris_cpu_gemm", jnp.dtype(jnp.bfloat16): "polaris_cpu_gemm_bf16"}
MAX_TARGETS = {jnp.dtype(jnp.float32): "polaris_cpu_gemm_max", jnp.dtype(jnp.bfloat16): "polaris_cpu_gemm_max_bf16"}
MAX_KERNEL_ROWS = 512  # above, XLA's blocked GEMM on a transient unpacked copy is faster (BENCHMARKS.md)
PAGED_TARGET = "polaris_cpu_paged_decode"
PAGED_LIMITS = dict(group=64, group_dims=8192, page_size=1024)  # cpu_paged.cc's stack buffers
_SOURCES = [Path(__file__).with_name(name) for name in ("cpu_gemm.cc", "cpu_paged.cc")]
_HEADERS = [Path(__file__).with_name("cpu_pool.h")]
# Projection weights packed per layer kind, with how many leading axes each contracts.
_ATTENTION = {"q": 1, "k": 1, "v": 1, "o": 2}
_MLP = {"gate": 1, "up": 1, "down": 1}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight of shape in_shape + out_shape stored as column panels of its [K, N] matrix.

    panels_pkt: [P, K, NT] float32 or bfloat16; panel p holds columns [p·NT, (p+1)·NT), zero past N.
    """

    panels_pkt: jax.Array
    in_shape: tuple = dataclasses.field(metadata=dict(static=True))
    out_shape: tuple = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple:
        return self.in_shape + self.out_shape

    def unpacked_kn(self) -> jax.Array:
        """The [K, N] matrix (a copy)."""
        p, k, t = self.panels_pkt.shape
        return jnp.transpose(self.panels_pkt, (1, 0, 2)).reshape(k, p * t)[:, : int(np.prod(self.out_shape))]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BitsEmbedding:
    """A bfloat16 embedding table held as its uint16 bits: XLA CPU's gather does not take bf16, so a
    plain lookup inside the decode loop makes XLA convert the whole table to float32 once per call."""

    bits_vd: jax.Array  # uint16 [vocab, embed]

    def __getitem__(self, tokens):
        return jax.lax.bitcast_convert_type(self.bits_vd[tokens], jnp.bfloat16)


def _cache_dir() -> Path:
    return Path(os.environ.get("POLARIS_JAX_CACHE", Path.home() / ".cache" / "polaris_jax"))


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _build(compiler: str) -> Path:
    """Compiles the kernel once per (source, jaxlib, CPU); the .so appears atomically."""
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-exceptions", f"-I{include}"]
    sources = [source.read_text() for source in _SOURCES + _HEADERS]
    parts = [*sources, importlib.metadata.version("jaxlib"), compiler, *flags[:-1], _cpu_flags()]
    key = hashlib.sha256("\0".join(parts).encode())
    out = _cache_dir() / f"cpu_gemm-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        command = [compiler, *flags, *map(str, _SOURCES), "-o", str(built)]
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(built, out)
    return out


@functools.cache
def _library():
    """The loaded kernel library, registered with XLA, or None (with one warning) if it cannot be built."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        warnings.warn("polaris_jax: no C++ compiler found; CPU decoding uses XLA's matmuls (slower)", stacklevel=2)
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(
            f"polaris_jax: building the CPU matmul kernel failed, using XLA's matmuls: {detail}", stacklevel=2
        )
        return None
    lib.polaris_cpu_gemm_panel.restype = ctypes.c_int64
    symbols = (lib.PolarisCpuGemm, lib.PolarisCpuGemmBf16, lib.PolarisCpuGemmMax, lib.PolarisCpuGemmMaxBf16)
    symbols = (*symbols, lib.PolarisCpuPagedDecode)
    for target, symbol in zip([*TARGETS.values(), *MAX_TARGETS.values(), PAGED_TARGET], symbols):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    return lib


def available() -> bool:
    """Whether packed matmuls can run here (the default backend is CPU and the kernel builds)."""
    return jax.default_backend() == "cpu" and _library() is not None


def panel_width() -> int:
    return int(_library().polaris_cpu_gemm_panel())


def pack(weight: jax.Array, in_axes: int) -> PackedWeight:
    """Packs a weight whose first `in_axes` axes are contracted (call under jit to fuse the copy)."""
    if weight.dtype not in TARGETS:
        raise ValueError(f"packed matmuls take float32 or bfloat16 weights, not {weight.dtype}")
    in_shape, out_shape = tuple(weight.shape[:in_axes]), tuple(weight.shape[in_axes:])
    k, n, t = int(np.prod(in_shape)), int(np.prod(out_shape)), panel_width()
    panels = -(-n // t)
    w_kn = jnp.pad(weight.reshape(k, n), ((0, 0), (0, panels * t - n)))
    return PackedWeight(jnp.transpose(w_kn.reshape(k, panels, t), (1, 0, 2)), in_shape, out_shape)


def matmul(x, weight: PackedWeight) -> jax.Array:
    """x [..., *in_shape] @ weight -> float32 [..., *out_shape]; products and sums in float32 (x is widened
    to float32, so a bfloat16 x and weight multiply as in XLA's bf16 dot with a float32 result)."""
    lead = x.shape[: x.ndim - len(weight.in_shape)]
    if x.shape[len(lead) :] != weight.in_shape:
        raise ValueError(f"x {x.shape} does not end with the weight's input shape {weight.in_shape}")
    rows, k = int(np.prod(lead)), int(np.prod(weight.in_shape))
    n = int(np.prod(weight.out_shape))
    x_mk = x.reshape(rows, k).astype(jnp.float32)
    if rows <= MAX_KERNEL_ROWS:
        call = jax.ffi.ffi_call(TARGETS[weight.panels_pkt.dtype], jax.ShapeDtypeStruct((rows, n), jnp.float32))
        y_mn = call(x_mk, weight.panels_pkt)
    else:  # long prefills: the kernel re-reads x once per panel
        y_mn = jnp.dot(x_mk, weight.unpacked_kn().astype(jnp.float32), preferred_element_type=jnp.float32)
    return y_mn.reshape(lead + weight.out_shape)


def greedy_logprob(x, weight: PackedWeight, logprob: bool = True) -> tuple[jax.Array, jax.Array]:
    """(argmax_m int32, log_softmax at it float32) of the logits x [M, K] @ weight [K, N], the [M, N] logits
    never written: the kernel reduces each panel of a row (max, the first column at it, sum of exp(logit -
    max)) as it computes it, and the panels combine here. The argmax is `jnp.argmax` of `matmul`'s logits
    (the same products and sums); the logprob equals log_softmax up to float rounding in the sum.
    logprob=False skips the sums (a third of the kernel's time at hidden 32): the logprobs are then NaN."""
    rows, n = x.shape[0], int(np.prod(weight.out_shape))
    panels = weight.panels_pkt.shape[0]
    if x.ndim != 2 or len(weight.out_shape) != 1 or rows > MAX_KERNEL_ROWS:
        raise ValueError(f"greedy_logprob wants x [M <= {MAX_KERNEL_ROWS}, K] and a [K, N] weight, got {x.shape}")
    outputs = (
        jax.ShapeDtypeStruct((rows, panels), jnp.float32),
        jax.ShapeDtypeStruct((rows, panels), jnp.float32),
        jax.ShapeDtypeStruct((rows, panels), jnp.int32),
    )
    call = jax.ffi.ffi_call(MAX_TARGETS[weight.panels_pkt.dtype], outputs)
    max_mp, sum_mp, arg_mp = call(x.astype(jnp.float32), weight.panels_pkt, n=np.int64(n), mass=np.int64(logprob))
    max_m1 = jnp.max(max_mp, axis=1, keepdims=True)
    # The first panel at the row's maximum found its first column (its worker's running max was <= it).
    first_p = jnp.argmax(max_mp == max_m1, axis=1)
    token_m = jnp.take_along_axis(arg_mp, first_p[:, None], axis=1)[:, 0]
    # A row of NaN logits has no maximum: the last id, as `vocab_blocks.first_argmax` gives (its logprob NaN).
    token_m = jnp.where(token_m >= 0, token_m, n - 1)
    if not logprob:
        return token_m, jnp.full(token_m.shape, jnp.nan, jnp.float32)
    return token_m, -jnp.log(jnp.sum(sum_mp * jnp.exp(max_mp - max_m1), axis=1))


def paged_decode(q_bhd, k_pages_kpsd, v_pages_kpsd, page_table_bp, visible_b) -> jax.Array:
    """Decode attention over pages read in place (`cpu_paged.cc`): float32 [B, H, D] for the already scaled
    float32 queries q_bhd against float32 pages [KV, P, S, D], each row seeing its first `visible_b`
    positions (0: zeros) through its int32 table [B, NP]."""
    call = jax.ffi.ffi_call(PAGED_TARGET, jax.ShapeDtypeStruct(q_bhd.shape, jnp.float32))
    return call(
        q_bhd.astype(jnp.float32),
        k_pages_kpsd,
        v_pages_kpsd,
        page_table_bp.astype(jnp.int32),
        visible_b.astype(jnp.int32),
    )


def pack_projections(params: dict) -> dict:
    """The decode layout (`transformer.unstack_layers`) with float32 / bfloat16 projection weights packed:
    q/k/v/o of every layer, the dense layers' MLP and `lm_head`. MoE experts and LoRA factors stay. A
    bfloat16 embedding table becomes a `BitsEmbedding` (the layout has its own `lm_head`, so the table
    is only looked up)."""
    out = dict(params)
    if out["embed"].dtype == jnp.bfloat16 and "lm_head" in out:
        out["embed"] = BitsEmbedding(jax.lax.bitcast_convert_type(out["embed"], jnp.uint16))
    if "lm_head" in out and out["lm_head"].dtype in TARGETS:
        out["lm_head"] = pack(out["lm_head"], 1)
    for name, layers in params.items():
        if not name.endswith("_layers"):
            continue
        if not isinstance(layers, (list, tuple)):
            raise ValueError(f"{name} is stacked; pack the decode layout (transformer.unstack_layers)")
        packed_names = {**_ATTENTION, **(_MLP if name == "dense_layers" else {})}
        out[name] = tuple(
            {
                key: pack(w, packed_names[key]) if key in packed_names and w.dtype in TARGETS else w
                for key, w in layer.items()
            }
            for layer in layers
        )
    return out
