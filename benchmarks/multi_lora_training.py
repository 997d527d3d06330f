"""Multi-LoRA training: N clients' forward_backward requests as one stacked call against one call each.

    .venv/bin/python benchmarks/multi_lora_training.py [--model=tiny|0.6b] [--clients=2,4,8] [--rows=4]
        [--tokens=128] [--repeats=3]

What the server does when several Tinker clients' forward_backward calls wait together
(`serve/tinker_training.py`): `adapters.forward_backward(..., stack=Stack.of(specs))` over every
client's rows, against the same rows run client by client (`adapters.forward_backward` per adapter,
what it did before). Clients have ranks 8, 16, 32, ... in turn, LoRA on attention and MLP. Each row of
output is one client count: seconds of both sides (best of --repeats after a compiling call, the two
sides interleaved: `timing.interleaved_best`) and their ratio. Prints one JSON object per client count.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from timing import interleaved_best, timed

from polaris_jax.models import ModelConfig, init_params
from polaris_jax.train import adapters


def model_config(name: str) -> ModelConfig:
    if name == "tiny":
        return ModelConfig.tiny(
            "qwen3", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
            intermediate_size=768,
        )  # fmt: skip
    return ModelConfig.qwen3_0p6b(vocab_size=32000)


def client_rows(rng, n: int, tokens: int, vocab: int) -> list[dict]:
    return [
        {
            "tokens": rng.randint(0, vocab, tokens),
            "target_tokens": rng.randint(0, vocab, tokens),
            "logprobs": -rng.rand(tokens).astype(np.float32),
            "advantages": rng.randn(tokens).astype(np.float32),
        }
        for _ in range(n)
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "0.6b"])
    parser.add_argument("--clients", default="2,4,8")
    parser.add_argument("--rows", type=int, default=4, help="rows per client")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    config = model_config(args.model)
    base = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    keys, cfg = ("logprobs", "advantages"), {}
    for n in [int(c) for c in args.clients.split(",")]:
        specs = [adapters.AdapterSpec(rank=8 << (i % 3), seed=i) for i in range(n)]
        trained = [adapters.init_adapter(config, s) for s in specs]
        rng = np.random.RandomState(n)
        rows = [client_rows(rng, args.rows, args.tokens, config.vocab_size) for _ in specs]
        batches = [adapters.pad_batch(r, keys, {}) for r in rows]
        together = adapters.pad_batch([row for r in rows for row in r], keys, {})
        together["adapter_rows_b"] = np.repeat(np.arange(n, dtype=np.int32), args.rows)
        stack = adapters.Stack.of(specs)

        def stacked():
            out = adapters.forward_backward(config, "importance_sampling", base, tuple(trained), together, cfg, stack)
            jax.block_until_ready(out["grads"])

        def one_by_one():
            for spec, adapter, batch in zip(specs, trained, batches):
                out = adapters.forward_backward(
                    spec.model_config(config), "importance_sampling", base, adapter, batch, cfg
                )
                jax.block_until_ready(out["grads"])

        stacked(), one_by_one()  # compile
        best = interleaved_best(
            {"stacked": lambda: timed(stacked), "one_by_one": lambda: timed(one_by_one)}, args.repeats
        )
        print(
            json.dumps(
                {
                    "model": args.model,
                    "clients": n,
                    "rows_per_client": args.rows,
                    "tokens_per_row": args.tokens,
                    "stacked_s": round(best["stacked"], 4),
                    "one_by_one_s": round(best["one_by_one"], 4),
                    "speedup": round(best["one_by_one"] / best["stacked"], 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
