"""The packed-panel CPU matmul (models/cpu_gemm.cc) against XLA's dot on the same fp32 weights.

    .venv/bin/python benchmarks/cpu_gemm.py [--rows 1,8,64,256] [--repeats 5]

Prints one JSON object per row count. Each side runs the 28 layers' worth of one projection shape of
Qwen3-0.6B as a dependent chain (x -> tanh(x @ W_l) -> ...), as decoding does, under one jit; the sides
alternate within each round and the best round counts. Weight bytes read per second = the decode
bandwidth figure (at small row counts the weights dominate what a step reads).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_best, timed

from polaris_jax.models import cpu_gemm

LAYERS = 28
SHAPES = {"gate/up [1024, 3072]": (1024, 3072), "down [3072, 1024]": (3072, 1024)}


def chain(matmul):
    """jit of x [M, K] through every weight in turn; each output, cut or tiled back to K columns, feeds
    the next, so the layers run in sequence as decoding's do."""

    def run(x_mk, weights):
        k = x_mk.shape[1]
        for w in weights:
            y_mn = jnp.tanh(matmul(x_mk, w))
            x_mk = y_mn[:, :k] if y_mn.shape[1] >= k else jnp.tile(y_mn, (1, k // y_mn.shape[1]))
        return x_mk

    return jax.jit(run)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,8,64,256")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not cpu_gemm.available():
        raise SystemExit("the CPU matmul kernel is unavailable here (CPU backend and a C++ compiler needed)")
    rng = np.random.default_rng(0)
    pack = jax.jit(cpu_gemm.pack, static_argnums=1)
    sides = {
        "xla_dot": chain(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)),
        "packed_kernel": chain(cpu_gemm.matmul),
    }
    for shape_name, (k, n) in SHAPES.items():
        weights = [jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.float32) for _ in range(LAYERS)]
        packed = [pack(w, 1) for w in weights]
        args_of = {"xla_dot": weights, "packed_kernel": packed}
        for rows in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
            for name, fn in sides.items():
                jax.block_until_ready(fn(x, args_of[name]))  # compile
            best = interleaved_best(
                {
                    name: (lambda fn=fn, w=args_of[name]: timed(lambda: jax.block_until_ready(fn(x, w))))
                    for name, fn in sides.items()
                },
                args.repeats,
            )
            weight_bytes = LAYERS * k * n * 4
            print(
                json.dumps(
                    dict(
                        benchmark="cpu_gemm",
                        shape=shape_name,
                        rows=rows,
                        layers=LAYERS,
                        **{f"{name}_weight_gbps": round(weight_bytes / s / 1e9, 1) for name, s in best.items()},
                        **{f"{name}_gflops": round(2 * rows * k * n * LAYERS / s / 1e9, 1) for name, s in best.items()},
                        speedup=round(best["xla_dot"] / best["packed_kernel"], 2),
                        panel_width=cpu_gemm.panel_width(),
                        device=jax.devices()[0].device_kind,
                    )
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
