"""Long-context training cost: the GRPO update over a long-tail batch, packed (`algo.pack_tokens`) against
padded to the longest response, at the tiny shape on CPU; prints one JSON line per side and the ratio.

    .venv/bin/python benchmarks/long_context.py [--rows=64] [--max-response=1024] [--spread=20] [--repeats=3]

The batch: prompts of 16-48 tokens, responses with lognormal lengths whose 99th percentile is `spread`
times the 1st (`rollout.long_tail_budgets`, the longest at --max-response). Both sides run the same
update (token-mean PPO clip, one minibatch, two microbatches, float32) from the same state on the same
batch; the reported time is the median of --repeats updates after a compiling one. tokens/s counts real
(prompt + response) tokens. The SFT step under sequence parallelism: benchmarks/sequence_parallel_memory.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _batch(rows: int, max_response: int, spread: float, vocab: int):
    import numpy as np

    from polaris_jax.data.problems import Problem
    from polaris_jax.rollout import Rollouts, long_tail_budgets
    from polaris_jax.train.grpo import step as grpo_step

    rng = np.random.default_rng(0)
    prompt_width = 48
    lengths_b = long_tail_budgets([Problem(f"r{i}", (1,), "1") for i in range(rows)], max_response, spread, seed=0)
    prompt_len_b = rng.integers(16, prompt_width + 1, rows).astype(np.int32)
    prompt_bt = np.zeros((rows, prompt_width), np.int32)
    response_br = np.zeros((rows, max_response), np.int32)
    for i in range(rows):
        prompt_bt[i, prompt_width - prompt_len_b[i] :] = rng.integers(1, vocab, prompt_len_b[i])
        response_br[i, : lengths_b[i]] = rng.integers(1, vocab, lengths_b[i])
    rollouts = Rollouts(
        prompt_bt=prompt_bt,
        prompt_len_b=prompt_len_b,
        response_br=response_br,
        response_len_b=lengths_b,
        sampler_logprobs_br=np.full((rows, max_response), -2.0, np.float32),
        finish_b=np.zeros(rows, np.int32),
        correct_b=np.zeros(rows, np.float32),
        rewards_b=np.zeros(rows, np.float32),
        group_b=np.arange(rows, dtype=np.int32),
    )
    advantages_b = rng.normal(size=rows).astype(np.float32)
    mask_br = np.ones((rows, max_response), np.float32)
    return grpo_step.update_batch(rollouts, advantages_b, mask_br)


def _side(batch, pack_tokens: int, repeats: int) -> dict:
    import jax

    from polaris_jax.models import ModelConfig, make_mesh
    from polaris_jax.train import partitioning
    from polaris_jax.train.grpo import step as grpo_step
    from polaris_jax.train.grpo.packing import pack_update_batch
    from polaris_jax.train.optimizer import make_optimizer

    rows, r = batch.response_br.shape
    model_config = ModelConfig.tiny(vocab_size=256)
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    params = partitioning.init_sharded_params(model_config, jax.random.PRNGKey(0), mesh)
    mask = jax.tree.map(lambda _: True, params)
    optimizer, schedule = make_optimizer(peak_lr=1e-5, total_steps=100, grad_clip_norm=1.0)
    shardings = partitioning.state_shardings(model_config, optimizer, mask, mesh)
    state = partitioning.init_sharded_state(params, optimizer, jax.random.PRNGKey(1), mask, shardings)
    settings = grpo_step.UpdateSettings(
        max_response_len=r,
        policy_loss_kwargs={"clip_low": 0.2, "clip_high": 0.28},
        microbatches=2,
        chunk_size=256,
        pack_tokens=pack_tokens,
    )
    update = grpo_step.make_grpo_update(
        model_config, optimizer, schedule, settings, mesh=mesh, state_shardings=shardings, rows=rows
    )
    started = time.perf_counter()
    host = pack_update_batch(batch, row_tokens=pack_tokens, minibatches=1, microbatches=2) if pack_tokens else batch
    pack_s = time.perf_counter() - started
    batch_shardings = grpo_step.batch_shardings(mesh, rows=rows, packed=bool(pack_tokens))
    device_batch = grpo_step.put_update_batch(host, batch_shardings)
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        state, metrics = update(state, device_batch, jax.random.PRNGKey(i), None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    tokens = int(batch.segment_ids_bt.sum())
    shape = host.tokens_mkl.shape if pack_tokens else host.tokens_bt.shape
    step_s = statistics.median(times[1:])
    return {
        "side": "packed" if pack_tokens else "padded",
        "model_rows_x_tokens": list(shape),
        "real_tokens": tokens,
        "update_s": step_s,
        "tokens_per_s": tokens / step_s,
        "host_pack_s": pack_s,
        "loss": float(metrics["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-response", type=int, default=1024)
    parser.add_argument("--spread", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batch = _batch(args.rows, args.max_response, args.spread, vocab=256)
    longest = batch.tokens_bt.shape[1]
    padded = _side(batch, 0, args.repeats)
    print(json.dumps(padded), flush=True)
    packed = _side(batch, longest, args.repeats)
    print(json.dumps(packed), flush=True)
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "rows": args.rows,
        "max_response": args.max_response,
        "spread": args.spread,
        "packed_vs_padded_tokens_per_s": packed["tokens_per_s"] / padded["tokens_per_s"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
