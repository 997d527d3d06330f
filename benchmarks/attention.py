"""Causal attention forward + backward: blockwise (flash) against dense and torch's SDPA, same shapes.

    python benchmarks/attention.py [--lengths 1024,2048,4096 --repeats 3]

Prints one JSON object per length: seconds per forward+backward of our flash path, our dense path and
`torch.nn.functional.scaled_dot_product_attention(is_causal=True)` (when torch is installed), their
ratios, and the compiled XLA temp bytes of both our paths next to the size of one [heads, T, T] float32
score matrix. Shape: batch 1, 16 query heads, 8 KV heads, head_dim 128 (Qwen3-0.6B's attention).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from polaris_jax.models import attention as attn_lib
from polaris_jax.models.flash_attention import flash_attention

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128


def _best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _ours(length: int, flash: bool, block: int, repeats: int) -> tuple[float, int]:
    seg = jnp.ones((1, length), jnp.int32)
    if flash:
        attend = lambda q, k, v: flash_attention(q, k, v, seg, seg, block_q=block, block_kv=block)
    else:
        attend = lambda q, k, v: attn_lib.grouped_attention(q, k, v, attn_lib.self_mask(seg))
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, length, HEADS, HEAD_DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, length, KV_HEADS, HEAD_DIM)), jnp.float32) for _ in range(2))
    temp = step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    return _best_seconds(lambda: jax.block_until_ready(step(q, k, v)), repeats), temp


def _torch_sdpa(length: int, repeats: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, length, HEAD_DIM, generator=gen, requires_grad=True)
    k, v = (
        torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen)
        .repeat_interleave(HEADS // KV_HEADS, 1)
        .requires_grad_()
        for _ in range(2)
    )

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        (out**2).sum().backward()

    return _best_seconds(step, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for length in map(int, args.lengths.split(",")):
        flash_s, flash_temp = _ours(length, True, args.block, args.repeats)
        dense_s, dense_temp = _ours(length, False, args.block, args.repeats)
        torch_s = _torch_sdpa(length, args.repeats)
        row = dict(
            length=length,
            block=args.block,
            flash_s=round(flash_s, 4),
            dense_s=round(dense_s, 4),
            dense_over_flash=round(dense_s / flash_s, 2),
            flash_temp_bytes=flash_temp,
            dense_temp_bytes=dense_temp,
            scores_bytes=HEADS * length * length * 4,
            torch_sdpa_s=None if torch_s is None else round(torch_s, 4),
            torch_over_flash=None if torch_s is None else round(torch_s / flash_s, 2),
            device=jax.devices()[0].device_kind,
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
