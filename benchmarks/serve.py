"""The server, `python -m polaris_jax.serve`, against its peers: SkyRL tx on Tinker RL steps, `transformers serve`
on concurrent OpenAI completions, and a mixed load run with malformed requests.

    .venv/bin/python benchmarks/serve.py                  # about 10 minutes on a 2-core CPU VM
    .venv/bin/python benchmarks/serve.py --quick          # a smoke run: fewer steps and requests
    .venv/bin/python benchmarks/serve.py --sections serving --skyrl_python= --tf_python=/tmp/venv_tfserve/bin/python

Meant for: the project's 2-core x86-64 CPU VM (24 GiB), every server on CPU, one loaded at a time, the clients in
this process on the same cores (the same client code for both sides of a comparison). Each section prints
one JSON object; a peer whose venv is missing (or that fails to start) is skipped with a note in its
section's JSON.

Peers, each in its own venv (they pin other jax/transformers versions than this repo):

    python3 -m venv /tmp/venv_skyrl && /tmp/venv_skyrl/bin/pip install 'skyrl-tx[tinker]==0.3.0' \\
        'jax>=0.8,<1.0' 'flax>=0.12.2' 'optax>=0.2.5'
    python3 -m venv /tmp/venv_tfserve && /tmp/venv_tfserve/bin/pip install torch 'transformers[serving]'
    python3 -m venv /tmp/venv_tinker_old && /tmp/venv_tinker_old/bin/pip install 'tinker==0.16.1' numpy httpx

(the CPU torch wheel for the second; on this VM it lies in /opt/wheels). SkyRL tx is launched as
`PYTHON -m tx.tinker.api --base-model DIR --backend-config JSON ...` (its README's command, on jax CPU; its
API server starts its engine through `uv run --extra ...`, which needs SkyRL's source checkout, so a `uv`
shim first on PATH runs `PYTHON -m tx.tinker.engine ...` instead); transformers as `transformers serve DIR
--continuous-batching --attn-implementation sdpa --device cpu` (the `transformers` script beside
`--tf_python`; its completions take text prompts only and it has no ignore_eos, hence the no-EOS model).

The model: a tiny random Qwen3 (hidden 32, 2 layers, the real Qwen3 tokenizer, 151,669 ids) built in a
temp dir by tests/serve/server_helpers.tiny_checkpoint, with `"eos_token_id": []` in its
generation_config.json, so no side stops at EOS and every request generates exactly its max_tokens
(checked: `exact_lengths` in the JSON). `--model DIR` uses another checkpoint as it is (its EOS ids then
stop requests early, on each side alike).

Sections (`--sections`, comma-separated):
- training: the same Tinker SDK RL loop (this file's `rl_loop`) against this server and SkyRL tx. Each needs
  its own SDK: this server speaks tinker>=0.25's wire format only (protobuf forward_backward and results;
  0.38.0 from this venv drives it), SkyRL tx 0.3.0 the JSON one before it (0.38 fails on its missing
  /api/v1/client/config), so its loop runs in `--old_sdk_python` (tinker 0.16.1) as
  `PYTHON benchmarks/serve.py --rl_client URL ...`. The tiny checkpoint's config.json also gets a top-level
  rope_theta, which transformers 4.x (SkyRL's) reads. The loop:
  per step save_weights_and_get_sampling_client, `--rl_prompts` prompts x `--rl_group` samples of
  `--rl_max_tokens` tokens at temperature 1, a toy reward (the share of even token ids) centred per group,
  one forward_backward with the importance_sampling loss (the sampler's logprobs, the advantages), and
  optim_step (Adam). One untimed warm-up step (compiles), then `--rl_steps` timed steps: steps/s and the
  ratio polaris / skyrl.
- serving: `--requests` text completions (/v1/completions; seeded random-word prompts of 8-24 words;
  max_tokens drawn per request, numpy seed `--seed`, from a lognormal with median `--median` and log-sd
  `--sigma`, clipped to [1, `--max_new`]; `--temperature`, default 1: full-vocabulary sampling on both sides,
  as the checkpoint's generation_config sets do_sample and no top-k for transformers; 0: greedy on both,
  with a generation_config without do_sample, which transformers serves on its faster greedy path)
  sent with at most C in flight for each C in
  `--concurrency`, against this server and `transformers serve`, after an untimed warm-up pass of the same
  requests. Both servers stay up; `--rounds` timed passes, interleaved (each C goes to one side, then at once
  to the other), so the VM's drifting speed falls on both sides of a ratio alike; `idle_peers_cpu_s` shows
  that the idle side stayed idle. Output tok/s (usage.completion_tokens over the wall time of the batch),
  p50/p99 latency per request (non-streaming: to the full answer); per side and C the median round; the
  ratio at the largest C per round and its median; and the same requests sent one at a time to this server
  (the batching speedup).
- load: `--load_requests` mixed requests, 16 in flight, against this server: good ones (completions with
  token-id prompts, chat completions, streamed completions) and malformed ones (token ids outside the
  vocabulary, max_tokens 0 or past the context, a body that is not JSON, a missing field). Reports good
  requests that failed (target 0), malformed ones answered 5xx or 2xx (target 0), and the server process's
  RSS after a warm-up and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from serve_load import section_load
from serve_servers import (
    KEY,
    ROOT,
    WORDS,
    Server,
    build_model,
    emit,
    log,
    ours,
    peer_missing,
    resolved,
    running,
    skyrl,
    tf_serve,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a HF checkpoint dir (default: a tiny random Qwen3, no EOS)")
    parser.add_argument("--sections", default="training,serving,load")
    parser.add_argument("--skyrl_python", default="/tmp/venv_skyrl/bin/python", help="'' skips SkyRL tx")
    parser.add_argument("--tf_python", default="/tmp/venv_tfserve/bin/python", help="'' skips transformers serve")
    parser.add_argument(
        "--old_sdk_python",
        default="/tmp/venv_tinker_old/bin/python",
        help="a python with an older tinker SDK (0.16.1) that drives SkyRL tx, whose API predates 0.38's",
    )
    parser.add_argument("--rl_client", default="", help=argparse.SUPPRESS)  # internal: run the loop against URL
    parser.add_argument("--startup_timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    # training
    parser.add_argument("--rl_steps", type=int, default=5)
    parser.add_argument("--rl_prompts", type=int, default=4)
    parser.add_argument("--rl_group", type=int, default=4)
    parser.add_argument("--rl_max_tokens", type=int, default=16)
    parser.add_argument("--rl_prompt_len", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    # serving
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", default="16,32,64")
    parser.add_argument("--median", type=float, default=24.0, help="median drawn max_tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-sd of the lognormal max_tokens")
    parser.add_argument("--max_new", type=int, default=160, help="the cap on drawn max_tokens")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy on both sides")
    parser.add_argument("--max_seq_len", type=int, default=256, help="our server's context (the tiny model's)")
    parser.add_argument("--max_slots", type=int, default=64, help="our server's --max_slots")
    parser.add_argument("--no_sequential", action="store_true", help="skip the one-at-a-time pass")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per level and side, interleaved")
    # load
    parser.add_argument("--load_requests", type=int, default=200)
    parser.add_argument("--load_bad_share", type=float, default=0.25)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer steps and requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.rl_steps, args.rl_prompts, args.rl_group = 2, 2, 2
        args.requests, args.concurrency, args.max_new, args.median = 16, "4,16", 48, 12.0
        args.load_requests, args.rounds = 40, 1
    return args


def rl_loop(base: str, model: str, args) -> dict:
    """The SDK RL loop: one warm-up step, then args.rl_steps timed ones."""
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=base, api_key=KEY)
    start = time.perf_counter()
    client = resolved(service.create_lora_training_client(base_model=model, rank=args.rank, seed=0))
    create_s = time.perf_counter() - start
    rng = np.random.RandomState(args.seed)
    params = types.SamplingParams(max_tokens=args.rl_max_tokens, temperature=1.0)
    adam = types.AdamParams(learning_rate=1e-3)

    def step() -> dict:
        t0 = time.perf_counter()
        sampler = resolved(client.save_weights_and_get_sampling_client())
        t1 = time.perf_counter()
        prompts = [rng.randint(1000, 100_000, size=args.rl_prompt_len).tolist() for _ in range(args.rl_prompts)]
        futures = [sampler.sample(types.ModelInput.from_ints(p), args.rl_group, params) for p in prompts]
        data, rewards, tokens = [], [], 0
        for prompt, future in zip(prompts, futures):
            seqs = [s for s in future.result().sequences if s.tokens]
            reward = np.array([np.mean(np.asarray(s.tokens) % 2 == 0) for s in seqs], np.float32)
            rewards += reward.tolist()
            for seq, adv in zip(seqs, reward - reward.mean()):
                full, gen = prompt + list(seq.tokens), len(seq.tokens)
                logprobs = seq.logprobs if seq.logprobs is not None else [0.0] * gen
                inputs = dict(
                    target_tokens=full[1:],
                    logprobs=np.asarray([0.0] * (len(prompt) - 1) + list(logprobs), np.float32),
                    advantages=np.asarray([0.0] * (len(prompt) - 1) + [float(adv)] * gen, np.float32),
                )
                data.append(types.Datum(model_input=types.ModelInput.from_ints(full[:-1]), loss_fn_inputs=inputs))
                tokens += gen
        t2 = time.perf_counter()
        fwd_bwd = client.forward_backward(data, "importance_sampling")
        optim = client.optim_step(adam)
        loss = fwd_bwd.result().metrics.get("loss:sum")
        optim.result()
        t3 = time.perf_counter()
        reward = float(np.mean(rewards))
        return dict(save_s=t1 - t0, sample_s=t2 - t1, train_s=t3 - t2, tokens=tokens, reward=reward, loss=loss)

    warm = step()
    warmup_s = sum(warm[k] for k in ("save_s", "sample_s", "train_s"))
    steps = []
    start = time.perf_counter()
    for i in range(args.rl_steps):
        steps.append(step())
        log(f"  step {i}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in steps[-1].items()})}")
    total = time.perf_counter() - start

    close = getattr(service, "close", None)  # 0.38 heartbeats its session until closed (0.16 has no close)
    if close is not None:
        with contextlib.suppress(Exception):
            resolved(close("success"))

    def mean(key):
        return round(float(np.mean([s[key] for s in steps])), 3)

    return dict(
        steps_per_s=round(args.rl_steps / total, 4),
        seconds=round(total, 2),
        mean_save_s=mean("save_s"),
        mean_sample_s=mean("sample_s"),
        mean_train_s=mean("train_s"),
        sampled_tokens_per_step=mean("tokens"),
        create_model_s=round(create_s, 2),
        warmup_step_s=round(warmup_s, 2),
        losses=[s["loss"] for s in steps],
        rewards=[round(s["reward"], 3) for s in steps],
    )


def section_training(args, model: Path, work: Path) -> None:
    out: dict = dict(
        workload=dict(
            steps=args.rl_steps,
            prompts=args.rl_prompts,
            group=args.rl_group,
            max_tokens=args.rl_max_tokens,
            prompt_len=args.rl_prompt_len,
            lora_rank=args.rank,
            loss="importance_sampling",
        )
    )
    import tinker

    old_sdk = args.old_sdk_python if not peer_missing(args.old_sdk_python) else None
    # (name, server, the SDK's python: None for this process)
    sides = [("polaris", lambda: ours(model, work, args, max(16, args.rl_prompts * args.rl_group), "training"), None)]
    no_sdk = f"skipped: no python at {args.old_sdk_python!r} with an older tinker SDK (SkyRL tx 0.3.0 lacks 0.38's API)"
    missing = peer_missing(args.skyrl_python) or (None if old_sdk else no_sdk)
    if missing:
        out["skyrl"] = dict(note=missing)
    else:
        sides.append(("skyrl", lambda: skyrl(model, work, args, args.skyrl_python), old_sdk))
    for name, make, client_python in sides:
        server = make()
        try:
            with running(server, args.startup_timeout):
                sdk = tinker.__version__ if client_python is None else old_sdk_version(client_python)
                out[name] = dict(startup_s=server.startup_s, sdk=f"tinker {sdk}")
                out[name].update(run_loop(server.base, model, args, client_python))
        except Exception as e:  # noqa: BLE001 - a side that fails is reported, the others still run
            out.setdefault(name, {}).update(error=f"{type(e).__name__}: {e}"[:2000], log_tail=server.tail())
            log(f"{name} failed: {e}")
    if "steps_per_s" in out.get("polaris", {}) and "steps_per_s" in out.get("skyrl", {}):
        out["polaris_over_skyrl"] = round(out["polaris"]["steps_per_s"] / out["skyrl"]["steps_per_s"], 3)
    out["sdk_note"] = (
        "two SDK versions: this server speaks tinker>=0.25's wire format only (protobuf forward_backward and "
        "results), SkyRL tx 0.3.0 the JSON one before it (no /api/v1/client/config, no protobuf)"
    )
    emit("training", out)


def old_sdk_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('tinker'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def run_loop(base: str, model: Path, args, client_python: str | None) -> dict:
    """The RL loop here, or (client_python) in a subprocess running this file with --rl_client."""
    if client_python is None:
        return rl_loop(base, str(model), args)
    cmd = [client_python, __file__, "--rl_client", base, "--model", str(model), "--seed", str(args.seed)]
    for flag in ("rl_steps", "rl_prompts", "rl_group", "rl_max_tokens", "rl_prompt_len", "rank"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    sys.stderr.write(done.stderr[-3000:])
    if done.returncode != 0:
        raise RuntimeError(f"the SDK client exited {done.returncode}: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- serving


def serving_workload(args) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    drawn = rng.lognormal(np.log(args.median), args.sigma, args.requests)
    lengths = np.clip(np.rint(drawn), 1, args.max_new).astype(int)
    prompts = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 25)))) for _ in range(args.requests)]
    return [dict(prompt=p, max_tokens=int(n), temperature=args.temperature) for p, n in zip(prompts, lengths)]


async def _send_all(base: str, model: str, requests: list[dict], concurrency: int) -> dict:
    """Sends every request with at most `concurrency` in flight; latency and usage of each."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits, headers=headers) as client:

        async def one(req):
            async with gate:
                body = {k: req[k] for k in ("prompt", "max_tokens", "temperature")} | dict(model=model)
                start = time.perf_counter()
                try:
                    r = await client.post("/v1/completions", json=body)
                    seconds = time.perf_counter() - start
                    if r.status_code != 200:
                        return dict(error=f"{r.status_code} {r.text[:200]}", seconds=seconds)
                    usage = r.json().get("usage") or {}
                    return dict(seconds=seconds, tokens=int(usage.get("completion_tokens", 0)))
                except httpx.HTTPError as e:
                    return dict(error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in requests))
        return dict(wall=time.perf_counter() - start, results=results)


def send_all(base: str, model: str, requests: list[dict], concurrency: int) -> dict:
    run = asyncio.run(_send_all(base, model, requests, concurrency))
    results = run["results"]
    ok = [r for r in results if "error" not in r]
    latencies = np.array([r["seconds"] for r in ok]) if ok else np.zeros(1)
    tokens = sum(r["tokens"] for r in ok)
    exact = sum(1 for r, q in zip(results, requests) if r.get("tokens") == q["max_tokens"])
    out = dict(
        concurrency=concurrency,
        requests=len(requests),
        failed=len(results) - len(ok),
        output_tokens=tokens,
        seconds=round(run["wall"], 3),
        output_tok_per_s=round(tokens / run["wall"], 1),
        p50_latency_s=round(float(np.percentile(latencies, 50)), 3),
        p99_latency_s=round(float(np.percentile(latencies, 99)), 3),
        exact_lengths=f"{exact}/{len(requests)}",
    )
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        out["first_error"] = errors[0]
    return out


def _median_round(results: list[dict]) -> dict:
    """The round whose output tok/s is the median (the lower middle one for an even count)."""
    return sorted(results, key=lambda r: r["output_tok_per_s"])[(len(results) - 1) // 2]


def measure_interleaved(servers: dict[str, Server], model: str, requests: list[dict], levels: list[int], rounds: int):
    """rounds x levels x sides, each level sent to every side back to back (so a drift of the VM's speed falls
    on both sides of a ratio alike); each result carries the CPU seconds the idle sides spent meanwhile."""
    by_side: dict[str, list[list[dict]]] = {name: [[] for _ in levels] for name in servers}
    for r in range(rounds):
        for i, c in enumerate(levels):
            for name, server in servers.items():
                idle = [s for n, s in servers.items() if n != name]
                idle_before = sum(s.cpu_s() for s in idle)
                result = send_all(server.base, model, requests, c)
                result["idle_peers_cpu_s"] = round(sum(s.cpu_s() for s in idle) - idle_before, 2)
                by_side[name][i].append(result)
                log(f"  round {r} {name} c={c}: {json.dumps(result)}")
    return by_side


def section_serving(args, model: Path, work: Path) -> None:
    requests = serving_workload(args)
    levels = sorted(int(c) for c in args.concurrency.split(","))
    lengths = np.array([r["max_tokens"] for r in requests])
    out: dict = dict(
        workload=dict(
            requests=len(requests),
            concurrency=levels,
            rounds=args.rounds,
            max_tokens=dict(
                median=float(np.median(lengths)), mean=round(float(lengths.mean()), 1), max=int(lengths.max())
            ),
            total_max_tokens=int(lengths.sum()),
            prompt_words="8-24",
            endpoint=f"/v1/completions, temperature {args.temperature}, non-streaming",
            eos="none in generation_config (no stop before max_tokens)" if not args.model else "the model's",
        )
    )
    makers = {"polaris": lambda: ours(model, work, args, args.max_slots, "serving")}
    missing = peer_missing(args.tf_python)
    if missing:
        out["transformers"] = dict(note=missing)
    else:
        makers["transformers"] = lambda: tf_serve(model, work, args.tf_python)
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        for name, make in makers.items():  # every side started and warmed (untimed) before any timed pass
            server = make()
            try:
                stack.enter_context(running(server, args.startup_timeout))
                start = time.perf_counter()
                warm = send_all(server.base, str(model), requests, max(levels))
                out[name] = dict(startup_s=server.startup_s, warmup_s=round(time.perf_counter() - start, 2))
                if warm["failed"]:
                    out[name] |= dict(warmup_failed=warm["failed"], warmup_first_error=warm.get("first_error"))
                servers[name] = server
            except Exception as e:  # noqa: BLE001 - a side that fails is reported, the others still run
                out[name] = dict(error=f"{type(e).__name__}: {e}"[:2000], log_tail=server.tail())
                log(f"{name} failed: {e}")
        by_side = measure_interleaved(servers, str(model), requests, levels, args.rounds)
        for name, server in servers.items():
            out[name] |= dict(levels=[_median_round(results) for results in by_side[name]], rounds=by_side[name])
            out[name]["rss_mib"] = round(server.rss() / 2**20, 1)
        if "polaris" in servers and not args.no_sequential:
            ours_out = out["polaris"]
            ours_out["sequential"] = send_all(servers["polaris"].base, str(model), requests, 1)
            log(f"  polaris one at a time: {json.dumps(ours_out['sequential'])}")
            top = ours_out["levels"][-1]["output_tok_per_s"]
            ours_out["batching_speedup"] = round(top / max(ours_out["sequential"]["output_tok_per_s"], 1e-9), 2)
    if {"polaris", "transformers"} <= set(servers):
        pairs = list(zip(by_side["polaris"][-1], by_side["transformers"][-1]))
        ratio = lambda key, ours_over: [round(a[key] / b[key] if ours_over else b[key] / a[key], 2) for a, b in pairs]
        per_round = dict(
            output_tok_per_s=ratio("output_tok_per_s", True),
            p50_latency=ratio("p50_latency_s", False),
            p99_latency=ratio("p99_latency_s", False),
        )
        out[f"polaris_over_transformers_at_{levels[-1]}"] = {
            key: float(np.median(values)) for key, values in per_round.items()
        } | dict(per_round=per_round)
    emit("serving", out)


# -------------------------------------------------------------------------------------------------- load


def main(argv=None):
    args = parse_args(argv)
    if args.rl_client:  # the RL loop alone, in another venv's python (another tinker SDK)
        print(json.dumps(rl_loop(args.rl_client, args.model, args)), flush=True)
        return
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - {"training", "serving", "load"}
    if unknown:
        raise SystemExit(f"unknown sections: {sorted(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    try:
        model = Path(args.model).resolve() if args.model else build_model(work / "tiny_qwen3", args.temperature > 0)
        log(f"model {model}; work dir {work}")
        for name in sections:
            start = time.perf_counter()
            dict(training=section_training, serving=section_serving, load=section_load)[name](args, model, work)
            log(f"section {name}: {time.perf_counter() - start:.1f} s")
    finally:
        if os.environ.get("SERVE_BENCH_KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
