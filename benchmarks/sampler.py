"""Sampler throughput side by side with transformers' generate() on identical weights.

    .venv/bin/python benchmarks/sampler.py [--rows tiny,fp32_b1,fp32_b8,bf16_b8] [--repeats 3]

Prints one JSON object per row. Both sides decode greedily with no EOS, so both generate exactly
`new_tokens` per row and the tokens can be compared. Our weights come from `init_params`, are
exported with `save_hf` and loaded by transformers, so both run the same numbers. Times are the best
of `--repeats` calls after a warm-up call (which compiles); transformers is timed with torch's default
thread count and with one thread, and its faster setting is reported (on a shared machine torch's
thread pool can stall badly). The sides' calls are interleaved (one call of each side per round), so
a machine whose speed drifts slows every side alike. At batch 1 the row also reports the bytes of params plus
KV cache read
per decode step over the decode step time, next to the machine's bandwidth from a copy test and a
read (sum) test.

Where Tunix is installed in its own venv (`python3 -m venv .venv-tunix && .venv-tunix/bin/pip install
google-tunix==0.1.7`; or pass --tunix-python), each row also runs benchmarks/sampler_tunix.py on the same
checkpoint and prompts, in a subprocess after the other two sides have finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_best, timed

from polaris_jax.models import ModelConfig, init_params, save_hf
from polaris_jax.sampling import Buckets, generate

ROWS = {
    "tiny": dict(model="tiny qwen3", dtype="float32", batch=8, prompt=32, new=128),
    "fp32_b1": dict(model="qwen3-0.6B shape, vocab 32000", dtype="float32", batch=1, prompt=32, new=64),
    "fp32_b8": dict(model="qwen3-0.6B shape, vocab 32000", dtype="float32", batch=8, prompt=32, new=64),
    "bf16_b8": dict(model="qwen3-0.6B shape, vocab 32000", dtype="bfloat16", batch=8, prompt=32, new=64),
}


def model_config(row: dict) -> ModelConfig:
    dtypes = dict(param_dtype=row["dtype"], compute_dtype=row["dtype"])
    if row["model"] == "tiny qwen3":
        return ModelConfig.tiny(
            "qwen3",
            vocab_size=1024,
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            intermediate_size=768,
            tie_word_embeddings=True,
            **dtypes,
        )
    return ModelConfig.qwen3_0p6b(vocab_size=32000, **dtypes)


def _best_time(fn, repeats: int):
    """(best wall time of `repeats` calls after a warm-up call, the warm-up call's result)."""
    first = fn()
    return min(timed(fn) for _ in range(repeats)), first


def copy_bandwidth_gbps() -> dict:
    """Host memory bandwidth: a 1 GiB numpy copy (bytes read + written per second) and a jitted sum (read)."""
    src = np.ones(2**28, np.float32)
    dst = np.ones_like(src)
    copy_s, _ = _best_time(lambda: np.copyto(dst, src), 5)
    big = jnp.ones((2**28,), jnp.float32)
    total = jax.jit(jnp.sum)
    read_s, _ = _best_time(lambda: total(big).block_until_ready(), 5)
    return dict(
        copy_read_plus_write_gbps=round(2 * src.nbytes / copy_s / 1e9, 1), read_gbps=round(big.nbytes / read_s / 1e9, 1)
    )


def _hf_generate(model, prompts, new_tokens: int):
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].tolist()


def transformers_sides(path: str, row: dict, prompts):
    """({"transformers@T threads": timed call} for torch's default thread count and 1, greedy tokens)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, row["dtype"])).eval()
    tokens = _hf_generate(model, prompts, row["new"])  # warm-up

    def side(threads: int):
        def call() -> float:
            default = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return timed(lambda: _hf_generate(model, prompts, row["new"]))
            finally:
                torch.set_num_threads(default)

        return call

    return {f"transformers@{t}": side(t) for t in sorted({torch.get_num_threads(), 1})}, tokens


class TunixSide:
    """benchmarks/sampler_tunix.py --serve in Tunix's own interpreter: warmed up once, then one timed
    call per `()`, so its calls can be interleaved with the other sides'."""

    def __init__(self, python: str, model_dir: str, row: dict, prompts):
        prompts_path = os.path.join(model_dir, "prompts.json")
        with open(prompts_path, "w") as f:
            json.dump(prompts, f)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampler_tunix.py")
        self.proc = subprocess.Popen(
            [
                python,
                script,
                "--serve",
                "--model-dir",
                model_dir,
                "--prompts-json",
                prompts_path,
                "--new-tokens",
                str(row["new"]),
                "--dtype",
                row["dtype"],
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ready = self._reply()  # tunix_version, jax_version, tokens

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the Tunix side failed:\n{self.proc.stderr.read()[-2000:]}")
        return json.loads(line)

    def __call__(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._reply()["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def kv_bytes_read(config, row: dict) -> int:
    """Mean bytes of K and V a decode step reads: the step writing slot `end` attends over its whole
    cache bucket, the smallest bucket above `end` (prompts fill slots [0, prompt bucket))."""
    buckets = Buckets()
    itemsize = jnp.dtype(config.dtype).itemsize
    per_slot = 2 * config.num_layers * row["batch"] * config.num_kv_heads * config.head_dim * itemsize
    first = buckets.prompt_length(row["prompt"])
    ends = range(first, first + row["new"] - 1)
    return sum(per_slot * buckets.cache_length(end + 1) for end in ends) // len(ends)


def run_row(name: str, repeats: int, tunix_python: str | None) -> dict:
    row = ROWS[name]
    config = model_config(row)
    params = init_params(config, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(1, config.vocab_size, (row["batch"], row["prompt"])).tolist()
    ours = lambda new: generate(config, params, prompts, max_new_tokens=new, temperature=0.0)
    tokens = ours(row["new"]).tokens  # warm-up (compiles)
    ours(1)
    tunix = None
    with tempfile.TemporaryDirectory() as path:
        model_dir = os.path.join(path, "model")
        save_hf(config, params, model_dir)
        sides, hf_tokens = transformers_sides(model_dir, row, prompts)
        sides = {"ours": lambda: timed(lambda: ours(row["new"])), **sides}
        if tunix_python:
            tunix = TunixSide(tunix_python, model_dir, row, prompts)
            sides["tunix"] = tunix
        try:
            best = interleaved_best(sides, repeats)
        finally:
            if tunix:
                tunix.close()
    prefill_s = min(timed(lambda: ours(1)) for _ in range(repeats))
    ours_s = best.pop("ours")
    tunix_s = best.pop("tunix", None)
    hf_side = min(best, key=best.get)
    hf_s = best[hf_side]
    generated = row["batch"] * row["new"]
    result = dict(
        benchmark="sampler",
        row=name,
        **row,
        ours_tok_s=round(generated / ours_s, 1),
        transformers_tok_s=round(generated / hf_s, 1),
        ratio=round(hf_s / ours_s, 2),
        transformers_threads=int(hf_side.split("@")[1]),
        ours_decode_step_ms=round(1e3 * (ours_s - prefill_s) / (row["new"] - 1), 2),
        same_tokens_rows=sum(a == b for a, b in zip(tokens, hf_tokens)),
    )
    if tunix:
        result.update(
            tunix_tok_s=round(generated / tunix_s, 1),
            ratio_vs_tunix=round(tunix_s / ours_s, 2),
            tunix_same_tokens_rows=sum(a == b for a, b in zip(tokens, tunix.ready["tokens"])),
            tunix_version=tunix.ready["tunix_version"],
        )
    if row["batch"] == 1:
        step_s = (ours_s - prefill_s) / (row["new"] - 1)
        read = sum(x.nbytes for x in jax.tree.leaves(params)) + kv_bytes_read(config, row)
        result.update(bytes_read_per_step=read, achieved_gbps=round(read / step_s / 1e9, 1), **copy_bandwidth_gbps())
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--repeats", type=int, default=3)
    default_tunix = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-tunix", "bin", "python"
    )
    parser.add_argument(
        "--tunix-python",
        default=default_tunix if os.path.exists(default_tunix) else None,
        help="interpreter of a venv with google-tunix (default: .venv-tunix/bin/python if present)",
    )
    args = parser.parse_args()
    if args.tunix_python and not os.path.exists(args.tunix_python):
        raise SystemExit(f"--tunix-python {args.tunix_python!r} does not exist")
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {sorted(ROWS)}")
        result = run_row(name, args.repeats, args.tunix_python)
        result.update(device=jax.devices()[0].device_kind, xla_flags=os.environ.get("XLA_FLAGS", ""))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
