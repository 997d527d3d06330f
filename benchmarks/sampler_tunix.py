"""Greedy decode throughput of Google Tunix's native sampler on a Hugging Face Qwen3 checkpoint.

Runs in its own virtualenv (it must not share one with polaris_jax, whose jax/flax pins differ):

    python3 -m venv .venv-tunix
    .venv-tunix/bin/pip install google-tunix==0.1.7   # pulls jax/jaxlib (CPU), flax, safetensors, transformers

Command line (DIR holds config.json + *.safetensors, e.g. written by polaris_jax.models.save_hf; FILE is a
JSON list of equal-length token-id lists):

    .venv-tunix/bin/python benchmarks/sampler_tunix.py --model-dir DIR --prompts-json FILE \
        --new-tokens N --repeats R --dtype float32|bfloat16 [--serve]

The checkpoint is loaded with tunix.models.qwen3.params.create_model_from_safe_tensors and decoded with
tunix.generate.sampler.Sampler (temperature 0 = greedy), exactly N new tokens per row: the EOS id is -1,
which no token matches. Sampler only takes strings, so a tokenizer adapter maps "id id id" strings to ids
and back; its pad id is -1 too, so no real token is ever treated as padding (Tunix masks every token equal
to pad_id out of attention, generated ones included). Timing: one warm-up call (compiles), then the best
of R calls; each call prefills the prompts and runs Tunix's jitted decode loop, then copies the tokens to
the host. Prints one JSON line: tunix_version, jax_version, tok_s (= batch * N / best_s), best_s, tokens.
With --serve (how benchmarks/sampler.py drives it), it prints versions and tokens after the warm-up,
then one {"seconds": ...} line per "run" line read from stdin, until any other line or EOF.

Caveat: tunix 0.1.7's Qwen3 attention calls apply_rope without config.rope_theta, so RoPE always uses
theta 1e6; for a checkpoint with another rope_theta this script rebinds tunix.models.qwen3.model.apply_rope
to the checkpoint's theta (same cost, correct numbers) and says so on stderr. RoPE scaling is not supported.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prompts-json", required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--serve",
        action="store_true",
        help="after the warm-up print the tokens, then time one call per 'run' line on stdin",
    )
    args = p.parse_args(argv)
    if args.new_tokens < 1 or args.repeats < 1:
        raise SystemExit("--new-tokens and --repeats must be positive")
    return args


def load_prompts(path: str, vocab_size: int) -> list[list[int]]:
    try:
        with open(path) as f:
            prompts = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read prompts file {path}: {e}") from e
    ok = (
        isinstance(prompts, list)
        and prompts
        and all(isinstance(p, list) and p for p in prompts)
        and all(type(t) is int and 0 <= t < vocab_size for p in prompts for t in p)
    )
    if not ok:
        raise SystemExit(f"{path}: expected a non-empty JSON list of non-empty lists of token ids in [0, {vocab_size})")
    if len({len(p) for p in prompts}) != 1:
        raise SystemExit(f"{path}: all prompts must have the same length (no padding is done)")
    return prompts


class IdTokenizer:
    """Strings of space-separated token ids <-> ids; no BOS, and EOS/pad ids no token can take."""

    def encode(self, text, **_):
        return [int(t) for t in text.split()]

    def decode(self, ids, **_):
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return -1

    def pad_id(self):
        return -1


def tunix_config(hf: dict, dtype):
    from tunix.models.qwen3 import model as qwen3_model

    if hf.get("model_type", "qwen3") != "qwen3":
        raise SystemExit(f"model_type {hf.get('model_type')!r} is not qwen3")
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 1_000_000))
    if float(theta) != 1_000_000.0:  # tunix's Attention calls apply_rope without the config's theta
        qwen3_model.apply_rope = functools.partial(qwen3_model.apply_rope, rope_theta=float(theta))
        print(f"note: patched tunix qwen3 apply_rope to rope_theta={theta} (it hard-codes 1e6)", file=sys.stderr)
    if hf.get("rope_scaling") or (hf.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        print("warning: tunix's Qwen3 has no RoPE scaling (YaRN); it is ignored", file=sys.stderr)
    heads = hf["num_attention_heads"]
    return qwen3_model.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=heads,
        head_dim=hf.get("head_dim", hf["hidden_size"] // heads),
        num_kv_heads=hf.get("num_key_value_heads", heads),
        rope_theta=int(theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        use_tied_embedding=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=dtype,
    )


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.model_dir):
        raise SystemExit(f"model dir {args.model_dir!r} does not exist")
    config_path = os.path.join(args.model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise SystemExit(f"model dir {args.model_dir!r} has no config.json")
    if not any(f.endswith(".safetensors") for f in os.listdir(args.model_dir)):
        raise SystemExit(f"model dir {args.model_dir!r} has no *.safetensors file")
    with open(config_path) as f:
        hf = json.load(f)
    prompts = load_prompts(args.prompts_json, hf["vocab_size"])

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen3 import params as qwen3_params

    dtype = jnp.dtype(args.dtype)
    cfg = tunix_config(hf, dtype)
    model = qwen3_params.create_model_from_safe_tensors(args.model_dir, cfg, dtype=dtype)
    prompt_len, n = len(prompts[0]), args.new_tokens
    sampler = sampler_lib.Sampler(
        model,
        IdTokenizer(),
        sampler_lib.CacheConfig(
            cache_size=prompt_len + n, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim
        ),
    )
    texts = [" ".join(map(str, p)) for p in prompts]

    def call():
        out = sampler(
            texts, max_generation_steps=n, max_prompt_length=prompt_len, temperature=0.0, eos_tokens=[-1]
        )  # greedy (no top_p / beam_size); tokens come back on the host
        return [np.asarray(t).tolist() for t in out.tokens]

    tokens = call()
    if any(len(t) != n for t in tokens):
        raise SystemExit(f"tunix returned {[len(t) for t in tokens]} tokens per row, expected {n}")
    versions = {"tunix_version": importlib.metadata.version("google-tunix"), "jax_version": jax.__version__}
    if args.serve:  # benchmarks/sampler.py interleaves these calls with its other sides'
        print(json.dumps({**versions, "tokens": tokens}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            start = time.perf_counter()
            call()
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
        return
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    best = min(times)
    print(json.dumps({**versions, "tok_s": len(prompts) * n / best, "best_s": best, "tokens": tokens}))


if __name__ == "__main__":
    main()
