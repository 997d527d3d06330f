"""The load section of benchmarks/serve.py: 200 mixed requests, some malformed, against our server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import httpx
import numpy as np
from serve_servers import KEY, WORDS, emit, ours, running


def load_requests(args, vocab: int, context: int) -> list[dict]:
    """Mixed requests: (kind, path, body or raw bytes, good?, expected max_tokens)."""
    rng = np.random.default_rng(args.seed + 1)
    out = []
    for i in range(args.load_requests):
        n = int(np.clip(rng.lognormal(np.log(16), 0.8), 1, 64))
        prompt = rng.integers(0, 151_000, size=int(rng.integers(4, 32))).tolist()
        if rng.random() < args.load_bad_share:
            kind = ["bad_token_id", "bad_max_tokens_zero", "bad_max_tokens_context", "bad_json", "missing_prompt"][
                i % 5
            ]
            body: dict | bytes = dict(prompt=prompt, max_tokens=n)
            if kind == "bad_token_id":
                body["prompt"] = prompt[:-1] + [vocab + 10**6]
            elif kind == "bad_max_tokens_zero":
                body["max_tokens"] = 0
            elif kind == "bad_max_tokens_context":
                body["max_tokens"] = context + 1
            elif kind == "bad_json":
                body = b'{"prompt": [1, 2, 3], "max_tokens": 4,'
            else:
                del body["prompt"]
            out.append(dict(kind=kind, path="/v1/completions", body=body, good=False))
            continue
        kind = ["completion", "chat", "stream"][i % 3]
        if kind == "chat":
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 16))))
            body = dict(messages=[{"role": "user", "content": text}], max_tokens=n)
            out.append(dict(kind=kind, path="/v1/chat/completions", body=body, good=True, max_tokens=n))
        else:
            body = dict(prompt=prompt, max_tokens=n, stream=kind == "stream")
            out.append(dict(kind=kind, path="/v1/completions", body=body, good=True, max_tokens=n))
    return out


async def _load(base: str, model: str, requests: list[dict], concurrency: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=base, timeout=900, headers=headers) as client:

        async def one(req):
            body = req["body"]
            content = body if isinstance(body, bytes) else json.dumps(dict(body, model=model)).encode()
            async with gate:
                start = time.perf_counter()
                try:
                    r = await client.post(req["path"], content=content)
                    text = r.text
                except httpx.HTTPError as e:
                    return dict(status=0, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start)
                result = dict(status=r.status_code, seconds=time.perf_counter() - start)
                if r.status_code != 200:
                    result["error"] = text[:300]
                elif req["kind"] == "stream":
                    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
                    if not events or events[-1] != "[DONE]" or any('"error"' in e for e in events):
                        result["error"] = "bad stream: " + text[-300:]
                    else:
                        result["tokens"] = len([e for e in events[:-1] if json.loads(e)["choices"]])
                else:
                    result["tokens"] = r.json()["usage"]["completion_tokens"]
                return result

        return await asyncio.gather(*(one(r) for r in requests))


def section_load(args, model: Path, work: Path) -> None:
    server = ours(model, work, args, args.max_slots, "load")
    out: dict = dict()
    try:
        with running(server, args.startup_timeout):
            info = httpx.get(f"{server.base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
            vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
            context = args.max_seq_len
            requests = load_requests(args, vocab, context)
            warm = [r for r in requests if r["good"]][:32]
            start = time.perf_counter()
            warm_results = asyncio.run(_load(server.base, str(model), warm, 16))
            warmup_s = time.perf_counter() - start
            rss_warm = server.rss()
            samples: list[int] = []

            async def sample_rss(stop: asyncio.Event):
                while not stop.is_set():
                    samples.append(server.rss())
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.5)

            async def run():
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample_rss(stop))
                try:
                    return await _load(server.base, str(model), requests, 16)
                finally:
                    stop.set()
                    await sampler

            start = time.perf_counter()
            results = asyncio.run(run())
            seconds = time.perf_counter() - start
            rss_end = server.rss()
            alive = httpx.get(f"{server.base}/health").status_code == 200
        good = [(q, r) for q, r in zip(requests, results) if q["good"]]
        bad = [(q, r) for q, r in zip(requests, results) if not q["good"]]
        good_failed = [(q, r) for q, r in good if "error" in r]
        # the streamed token count is the number of content chunks, which can merge tokens: only a lower bound
        wrong_len = [
            (q, r) for q, r in good if "error" not in r and q["kind"] != "stream" and r.get("tokens") != q["max_tokens"]
        ]
        by_kind: dict = {}
        for q, r in bad:
            by_kind.setdefault(q["kind"], {}).setdefault(str(r["status"]), 0)
            by_kind[q["kind"]][str(r["status"])] += 1
        latencies = np.array([r["seconds"] for _, r in good if "error" not in r] or [0.0])
        out.update(
            requests=len(requests),
            concurrency=16,
            good=len(good),
            good_failed=len(good_failed),
            good_wrong_length=len(wrong_len) if not args.model else "n/a (the model's EOS)",
            malformed=len(bad),
            malformed_status=by_kind,
            malformed_5xx=sum(1 for _, r in bad if r["status"] >= 500 or r["status"] == 0),
            malformed_2xx=sum(1 for _, r in bad if 200 <= r["status"] < 300),
            seconds=round(seconds, 2),
            good_p50_latency_s=round(float(np.percentile(latencies, 50)), 3),
            good_p99_latency_s=round(float(np.percentile(latencies, 99)), 3),
            warmup=dict(requests=len(warm), seconds=round(warmup_s, 2), failed=sum("error" in r for r in warm_results)),
            rss_mib_after_warmup=round(rss_warm / 2**20, 1),
            rss_mib_peak_during=round(max(samples or [0]) / 2**20, 1),
            rss_mib_end=round(rss_end / 2**20, 1),
            healthy_after=alive,
            models=[m["id"] for m in info.get("data", [])][:1],
        )
        if good_failed:
            out["good_failed_examples"] = [dict(kind=q["kind"], **r) for q, r in good_failed[:3]]
        if wrong_len:
            out["wrong_length_examples"] = [
                dict(kind=q["kind"], want=q["max_tokens"], got=r["tokens"]) for q, r in wrong_len[:3]
            ]
    except Exception as e:  # noqa: BLE001
        out.update(error=f"{type(e).__name__}: {e}"[:2000], log_tail=server.tail())
    emit("load", out)
