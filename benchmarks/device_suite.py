"""One command for a short accelerator window: every figure the backends issue asks for, in one run.

    python -m benchmarks.device_suite --out=DIR            # one H100/H200 (or a TPU host): under 8 minutes
    python -m benchmarks.device_suite --out=DIR --tiny     # CPU dry run: tiny shapes, same code paths

Needs only this checkout and a stock JAX-CUDA or JAX-TPU install (jax, flax, optax; no tokenizer, data or
config packages: see `benchmarks/cases.py`), and no network. Writes DIR/device_suite.json and
DIR/device_suite.md (a table for BENCHMARKS.md). Each section runs on its own; one that fails (say, out of
memory) records its error and the rest go on. Sections (random weights throughout, bf16 weights and
activations, fp32 accumulation and losses):

- hbm: measured HBM bandwidth (a large elementwise copy: bytes read + written / time).
- sft_<shape>: SFT train step MFU on the Qwen3-1.7B and Qwen3-4B shapes at sequence 4096
  (`train/metrics.step_flops` / step time / the device's peak; goal >= 55%).
- decode: batch-1 engine decode on the Qwen3-4B shape: bytes read per token (weights + the KV cache read)
  / time per token, against the measured bandwidth (goal >= 80%).
- engine_<n>: the engine against static `generate` on the same n long-tail requests (n = 64, 256), tok/s.
- grpo: one GRPO step on the Qwen3-1.7B shape: engine rollout, then the update, timed apart.
Every section reports its first call (compile included) and its compiles after warm-up (goal: 0, counted
by jax.monitoring's backend-compile events), and which kernels its programs lowered to.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases
from polaris_jax.files import write_atomic
from polaris_jax.models import preset
from polaris_jax.models.config import ModelConfig
from polaris_jax.sampling import Engine, EngineSettings, Request, generate
from polaris_jax.train import metrics

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of one run: the real ones, or `--tiny`'s for a CPU dry run."""

    sft: tuple[tuple[str, int], ...] = (("qwen3_1p7b", 4), ("qwen3_4b", 2))  # (preset, rows) at sequence
    sequence: int = 4096
    decode_preset: str = "qwen3_4b"
    decode_context: int = 2048
    engine_preset: str = "qwen3_1p7b"
    engine_requests: tuple[int, ...] = (64, 256)
    engine_max_new: int = 512  # also the GRPO rollout's: one warmed engine serves both sections
    prompt_len: int = 256
    grpo_preset: str = "qwen3_1p7b"
    grpo_prompts: int = 8
    grpo_samples: int = 8
    grpo_microbatches: int = 8
    hbm_bytes: int = 4 << 30
    repeats: int = 3


TINY = Sizes(
    sft=(("tiny", 2),),
    sequence=256,
    decode_preset="tiny",
    decode_context=64,
    engine_preset="tiny",
    engine_requests=(8,),
    engine_max_new=48,
    prompt_len=16,
    grpo_preset="tiny",
    grpo_prompts=2,
    grpo_samples=4,
    grpo_microbatches=2,
    hbm_bytes=64 << 20,
    repeats=2,
)


def model(name: str) -> ModelConfig:
    dtypes = dict(param_dtype="bfloat16", compute_dtype="bfloat16")
    if name == "tiny":
        return ModelConfig.tiny(head_dim=128, **dtypes)
    return preset(name, remat_policy="dots_no_batch", **dtypes)


def timed(fn, repeats: int) -> tuple[float, float, int]:
    """(first call seconds, best of `repeats` later calls, compiles during the later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    compiles, best = len(_COMPILES), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return first, best, len(_COMPILES) - compiles


def kernels(case: cases.Case) -> list[str]:
    platform = {"gpu": "cuda"}.get(jax.devices()[0].platform, jax.devices()[0].platform)  # lowering's name
    text = case.fn.trace(*case.args, **case.kwargs).lower(lowering_platforms=(platform,)).as_text()
    return sorted(cases.kernels_in(text))


def training_steps(case: cases.Case):
    """A thunk running the next step of a train-step case: its state is donated, so each call takes the last
    call's new state."""
    state = {"value": case.args[0]}

    def step():
        state["value"], out = case.fn(state["value"], *case.args[1:])
        return out["loss"]

    return step


def hbm(sizes: Sizes) -> dict:
    x = jnp.ones((sizes.hbm_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    first, best, _ = timed(lambda: copy(x), sizes.repeats + 2)
    return {"bytes_moved": 2 * x.nbytes, "seconds": best, "bandwidth_gb_s": 2 * x.nbytes / best / 1e9}


def sft(name: str, rows: int, sizes: Sizes) -> dict:
    config = model(name)
    case = cases.sft_case(config, rows, sizes.sequence)
    used = kernels(case)
    first, best, recompiles = timed(training_steps(case), sizes.repeats)
    tokens = rows * sizes.sequence
    flops = metrics.step_flops(config, tokens, rows * sizes.sequence * (sizes.sequence + 1) // 2)
    peak = metrics.peak_flops_per_device()
    return {
        "preset": name,
        "rows": rows,
        "sequence": sizes.sequence,
        "tokens_per_s": tokens / best,
        "step_s": best,
        "first_step_s": first,
        "recompiles_after_warmup": recompiles,
        "mfu": flops / best / (peak * jax.device_count()) if peak else None,
        "kernels": used,
    }


def decode(sizes: Sizes, bandwidth: float | None) -> dict:
    config = model(sizes.decode_preset)
    block = 8
    case = cases.decode_case(config, rows=1, context=sizes.decode_context, block=block)
    pages = {"value": case.args[2]}

    def call():
        pages["value"], tokens, *_ = case.fn(case.args[0], case.args[1], pages["value"], case.args[3], **case.kwargs)
        return tokens

    used = kernels(case)
    first, best, recompiles = timed(call, sizes.repeats + 2)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(case.args[1]))
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
    kv_bytes = kv_per_token * (sizes.decode_context + block / 2)  # the mean context read over the block
    per_token_s = best / block
    achieved = (weight_bytes + kv_bytes) / per_token_s / 1e9
    return {
        "preset": sizes.decode_preset,
        "context": sizes.decode_context,
        "tokens_per_s": 1 / per_token_s,
        "bytes_per_token": weight_bytes + kv_bytes,
        "achieved_gb_s": achieved,
        "fraction_of_hbm": achieved / bandwidth if bandwidth else None,
        "first_call_s": first,
        "recompiles_after_warmup": recompiles,
        "kernels": used,
    }


def long_tail(count: int, max_new: int, seed: int = 0) -> np.ndarray:
    """Response lengths: lognormal (median max_new / 4, log-sd 1), clipped to [1, max_new]."""
    draw = np.random.default_rng(seed).lognormal(np.log(max_new / 4), 1.0, count)
    return np.clip(np.round(draw), 1, max_new).astype(int)


_ENGINES: dict = {}


def warm_engine(name: str, sizes: Sizes):
    """(config, params, engine, warm-up seconds): one per preset, warmed once. Its pool holds every slot at the
    long tail's mean length and a half (the engine preempts past that), so static `generate`'s dense cache
    fits beside it."""
    if name not in _ENGINES:
        config = model(name)
        params = jax.jit(lambda k: cases.init_params(config, k))(jax.random.key(0))
        page_size, slots = 16, max(sizes.engine_requests)
        settings = EngineSettings(
            max_slots=slots,
            page_size=page_size,
            num_pages=slots * -(-(sizes.prompt_len + sizes.engine_max_new) // page_size) // 2 + 1,
            max_seq_len=sizes.prompt_len + sizes.engine_max_new,
            prefill_chunk=2048,
        )
        eng = Engine(config, params, settings)
        start = time.perf_counter()
        eng.warmup()  # every program at every slot bucket
        _ENGINES[name] = (config, params, eng, time.perf_counter() - start)
    return _ENGINES[name]


def engine(count: int, sizes: Sizes) -> dict:
    config, params, eng, warmup = warm_engine(sizes.engine_preset, sizes)
    rng = np.random.default_rng(count)
    prompts = rng.integers(1, config.vocab_size, (count, sizes.prompt_len)).tolist()
    lengths = long_tail(count, sizes.engine_max_new, seed=count)
    requests = lambda ls: [Request(p, int(n), seed=i) for i, (p, n) in enumerate(zip(prompts, ls))]
    compiles = len(_COMPILES)
    start = time.perf_counter()
    eng.run(requests(lengths))
    engine_s = time.perf_counter() - start
    engine_recompiles = len(_COMPILES) - compiles
    static = lambda: generate(config, params, prompts, max_new_tokens=int(lengths.max()), seed=0, n=1)
    static_first, static_s, static_recompiles = timed(static, 1)
    useful = int(lengths.sum())
    return {
        "requests": count,
        "useful_tokens": useful,
        "engine_tok_s": useful / engine_s,
        "static_tok_s": useful / static_s,
        "engine_over_static": static_s / engine_s,
        "engine_warmup_s": warmup,
        "static_first_s": static_first,
        "recompiles_after_warmup": engine_recompiles + static_recompiles,
    }


def grpo(sizes: Sizes) -> dict:
    """Rollout (engine, n samples per prompt) then one update on it; reward: a stand-in (the share of even
    token ids), as this suite carries no verifier; advantages group-normalised."""
    config, _, eng, _ = warm_engine(sizes.grpo_preset, sizes)
    prompts, n, max_new = sizes.grpo_prompts, sizes.grpo_samples, sizes.engine_max_new
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(1, config.vocab_size, (prompts, sizes.prompt_len))
    requests = [Request(p.tolist(), max_new, n=n, seed=i) for i, p in enumerate(prompt_ids)]
    start = time.perf_counter()
    compiles = len(_COMPILES)
    completions = [c for group in eng.run(requests) for c in group]
    rollout_s = time.perf_counter() - start
    rollout_recompiles = len(_COMPILES) - compiles
    batch = cases.update_batch(prompts * n, sizes.prompt_len, max_new, config.vocab_size)
    for row, c in enumerate(completions):
        batch.tokens_bt[row, : sizes.prompt_len] = prompt_ids[row // n]
        batch.tokens_bt[row, sizes.prompt_len : sizes.prompt_len + len(c.tokens)] = c.tokens
        batch.mask_br[row] = np.arange(max_new) < len(c.tokens)
        batch.sampler_logprobs_br[row, : len(c.logprobs)] = c.logprobs
    batch.response_br[:] = batch.tokens_bt[:, sizes.prompt_len :]
    reward = np.array([np.mean(np.asarray(c.tokens) % 2 == 0) for c in completions]).reshape(prompts, n)
    advantages = (reward - reward.mean(1, keepdims=True)) / (reward.std(1, keepdims=True) + 1e-6)
    batch.advantages_b[:] = advantages.reshape(-1)
    case = cases.grpo_case(config, batch, sizes.grpo_microbatches)
    used = kernels(case)
    first, update_s, recompiles = timed(training_steps(case), 1)
    recompiles += rollout_recompiles
    return {
        "preset": sizes.grpo_preset,
        "responses": prompts * n,
        "generated_tokens": sum(len(c.tokens) for c in completions),
        "rollout_s": rollout_s,
        "update_s": update_s,
        "update_first_s": first,
        "step_s": rollout_s + update_s,
        "recompiles_after_warmup": recompiles,
        "kernels": used,
    }


def sections(sizes: Sizes):
    """(name, thunk) in run order; `decode` reads the bandwidth `hbm` measured."""
    found = {}
    yield "hbm", lambda: found.setdefault("hbm", hbm(sizes))
    for name, rows in sizes.sft:
        yield f"sft_{name}", lambda name=name, rows=rows: sft(name, rows, sizes)
    yield "decode", lambda: decode(sizes, found.get("hbm", {}).get("bandwidth_gb_s"))
    for count in sizes.engine_requests:
        yield f"engine_{count}", lambda count=count: engine(count, sizes)
    yield "grpo", lambda: grpo(sizes)


def markdown(report: dict) -> str:
    lines = [
        f"Device suite, {report['date']}, {report['device']} x{report['device_count']}, jax {report['jax']}",
        "",
        "| section | figure | value | first call (s) | recompiles | kernels |",
        "|---|---|---|---|---|---|",
    ]
    headline = {
        "hbm": ("bandwidth_gb_s", "GB/s"),
        "decode": ("fraction_of_hbm", "of HBM bandwidth"),
        "grpo": ("step_s", "s (rollout + update)"),
    }
    for name, result in report["sections"].items():
        if "error" in result:
            lines.append(f"| {name} | error | {result['error'].splitlines()[-1][:120]} | | | |")
            continue
        key, unit = headline.get(name, ("mfu", "MFU") if name.startswith("sft") else ("engine_over_static", "x static"))
        value = result.get(key)
        shown = "n/a" if value is None else f"{value:.3g} {unit}"
        first = result.get("first_step_s", result.get("first_call_s", result.get("update_first_s", "")))
        first = f"{first:.1f}" if isinstance(first, float) else ""
        lines.append(
            f"| {name} | {key} | {shown} | {first} | {result.get('recompiles_after_warmup', '')} "
            f"| {', '.join(result.get('kernels', []))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for device_suite.json and device_suite.md")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU dry run of every section")
    parser.add_argument("--only", default="", help="comma-separated section names (default: all)")
    parser.add_argument("--budget_s", type=float, default=420, help="start no section after this many seconds")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else Sizes()
    only = {s for s in args.only.split(",") if s}
    os.makedirs(args.out, exist_ok=True)
    device = jax.devices()[0]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "tiny": args.tiny,
        "sections": {},
    }
    start = time.perf_counter()
    for name, thunk in sections(sizes):
        if only and name not in only:
            continue
        began = time.perf_counter()
        if began - start > args.budget_s:
            report["sections"][name] = {"error": f"skipped: the {args.budget_s:.0f} s budget was spent"}
            continue
        try:
            report["sections"][name] = thunk()
        except Exception:  # one section's failure (OOM, a missing kernel) must not cost the others
            report["sections"][name] = {"error": traceback.format_exc(limit=3)}
        report["sections"][name]["wall_s"] = time.perf_counter() - began
        print(f"{name}: {json.dumps(report['sections'][name], default=str)}", file=sys.stderr, flush=True)
        _write(args.out, report)  # after every section: a window cut short keeps what it measured
    report["wall_s"] = time.perf_counter() - start
    _write(args.out, report)
    print(markdown(report))
    return report


def _write(out: str, report: dict) -> None:
    write_atomic(os.path.join(out, "device_suite.json"), json.dumps(report, indent=1, default=str))
    write_atomic(os.path.join(out, "device_suite.md"), markdown(report))


if __name__ == "__main__":
    main()
