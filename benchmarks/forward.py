"""Forward throughput and compile time, side by side with transformers on the same shape.

    python benchmarks/forward.py [--batch 1 --length 256 --repeats 3]

Prints one JSON object: our tokens/s, transformers' tokens/s and their ratio for a Qwen3-0.6B-shaped
model (random weights, vocab 32000, fp32), plus jit compile seconds at 4 and 28 layers (scanned
layers keep compile time flat in depth).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from polaris_jax.models import forward, init_params, preset, save_hf


def _config(layers: int):
    return preset("qwen3_0p6b", vocab_size=32000, num_layers=layers, tie_word_embeddings=True)


def _jitted():
    return jax.jit(lambda c, p, t, pos: forward(c, p, t, pos)[0], static_argnums=0)


def compile_seconds(layers: int, batch: int, length: int) -> float:
    config = _config(layers)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    start = time.perf_counter()
    _jitted().lower(config, shapes, tokens, tokens).compile()
    return time.perf_counter() - start


def ours_tokens_per_second(params, config, tokens, positions, repeats: int) -> float:
    fn = _jitted()
    fn(config, params, tokens, positions).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(config, params, tokens, positions).block_until_ready()
        times.append(time.perf_counter() - start)
    return tokens.size / min(times)


def transformers_tokens_per_second(path, tokens_np, repeats: int) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(tokens_np, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=ids)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return tokens_np.size / min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = _config(28)
    params = init_params(config, jax.random.key(0))
    tokens_np = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.length)).astype(np.int32)
    tokens = jnp.asarray(tokens_np)
    positions = jnp.broadcast_to(jnp.arange(args.length, dtype=jnp.int32), tokens.shape)
    ours = ours_tokens_per_second(params, config, tokens, positions, args.repeats)
    result = {
        "benchmark": "forward",
        "model": "qwen3_0p6b-shape vocab32000 fp32",
        "batch": args.batch,
        "length": args.length,
        "devices": str(jax.devices()[0].device_kind),
        "polaris_jax_tokens_per_s": round(ours, 1),
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(config, params, tmp + "/ckpt")
            del params
            theirs = transformers_tokens_per_second(tmp + "/ckpt", tokens_np, args.repeats)
        result.update(transformers_tokens_per_s=round(theirs, 1), ratio_vs_transformers=round(ours / theirs, 3))
    except ImportError:
        result["transformers_tokens_per_s"] = None
    result["compile_s_4_layers"] = round(compile_seconds(4, args.batch, args.length), 2)
    result["compile_s_28_layers"] = round(compile_seconds(28, args.batch, args.length), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
