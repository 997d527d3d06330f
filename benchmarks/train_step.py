"""SFT train-step throughput (forward + backward + AdamW), side by side with transformers/torch.

    python benchmarks/train_step.py [--preset qwen3_0p6b --vocab 32000 --batch 1 --length 256 --repeats 3]
    # accelerator MFU, no torch reference:
    python benchmarks/train_step.py --preset qwen3_1p7b --vocab 151936 --batch 8 --length 4096 \
        --compute-dtype bfloat16 --remat full --skip-torch

Prints one JSON object: our tokens/s (the jitted `make_sft_step`: chunked loss, global-norm clip,
AdamW, donated state), transformers' tokens/s for one forward/backward/`torch.optim.AdamW` step of
the same shape (random weights, fp32 on CPU, clip included), their ratio from the same run, and the
MFU estimate of `train/metrics.py` where the device's peak FLOP/s is known. Steps are timed
after one warm-up step; the best of `repeats` is reported.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import time

import jax
import numpy as np

from polaris_jax.models import make_mesh, preset
from polaris_jax.train import losses, metrics, partitioning
from polaris_jax.train.optimizer import make_optimizer
from polaris_jax.train.sft.step import make_sft_step


def _batch(args, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (args.batch, args.length + 1)).astype(np.int32)
    ones = np.ones((args.batch, args.length), np.int32)
    return {
        "tokens_bt": tokens[:, :-1],
        "targets_bt": tokens[:, 1:],
        "segment_ids_bt": ones,
        "loss_mask_bt": ones,
        "positions_bt": np.broadcast_to(np.arange(args.length, dtype=np.int32), ones.shape).copy(),
    }


def ours(args, config, batch) -> dict:
    mesh = make_mesh({"fsdp": -1})
    optimizer, schedule = make_optimizer(peak_lr=1e-5, total_steps=1000, grad_clip_norm=1.0)
    params = partitioning.init_sharded_params(config, jax.random.PRNGKey(0), mesh)
    mask = jax.tree.map(lambda _: True, params)
    shardings = partitioning.state_shardings(config, optimizer, mask, mesh)
    state = partitioning.init_sharded_state(params, optimizer, jax.random.PRNGKey(1), mask, shardings)
    del params
    step = make_sft_step(
        config,
        optimizer,
        schedule,
        mesh=mesh,
        state_shardings=shardings,
        loss_settings=losses.LossSettings(chunk_size=min(args.length, 1024)),
        batch_shape=batch["tokens_bt"].shape,
    )
    device_batch = partitioning.put_batch(
        batch, partitioning.batch_shardings(mesh, batch_shape=batch["tokens_bt"].shape)
    )
    start = time.perf_counter()
    state, m = step(state, device_batch, jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    first = time.perf_counter() - start
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        state, m = step(state, device_batch, jax.random.PRNGKey(i))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    tokens = batch["tokens_bt"].size
    flops = metrics.step_flops(config, tokens, metrics.attended_pairs(batch["segment_ids_bt"]))
    peak = metrics.peak_flops_per_device()
    best = min(times)
    out = {
        "tokens_per_s": tokens / best,
        "step_s": times,
        "first_step_s_incl_compile": first,
        "model_tflops_per_step": flops / 1e12,
        "loss": float(m["loss"]),
    }
    if peak:
        out["mfu"] = flops / best / (peak * len(jax.devices()))
    del state
    gc.collect()
    return out


def transformers_step(args, config) -> dict:
    import torch
    import transformers

    hf = dict(config.to_hf())
    architecture = hf.pop("architectures")[0]
    model = getattr(transformers, architecture)(transformers.AutoConfig.for_model(hf.pop("model_type"), **hf))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    batch = _batch(args, config.vocab_size)
    ids = torch.as_tensor(batch["tokens_bt"], dtype=torch.long)
    labels = ids  # transformers shifts labels inside the loss (T-1 trained positions vs our T)

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    one_step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - start)
    return {"tokens_per_s": ids.numel() / min(times), "step_s": times, "torch_threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3_0p6b")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    config = preset(args.preset, vocab_size=args.vocab, compute_dtype=args.compute_dtype, remat_policy=args.remat)
    batch = _batch(args, config.vocab_size)
    result = {
        "benchmark": "sft_train_step",
        "model": f"{args.preset}-shape vocab{args.vocab}",
        "compute_dtype": args.compute_dtype,
        "param_dtype": "float32",
        "batch": args.batch,
        "length": args.length,
        "device": jax.devices()[0].device_kind,
        "num_devices": len(jax.devices()),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "polaris_jax": ours(args, config, batch),
    }
    if not args.skip_torch:
        result["transformers"] = transformers_step(args, config)
        result["ratio_tokens_per_s"] = result["polaris_jax"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
