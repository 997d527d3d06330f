"""Rollouts with a long tail of lengths: row compaction on against off, in the same run.

    .venv/bin/python benchmarks/sampler_long_tail.py [--rows 64 --max-new 1024 --eos-ids 6 --repeats 3]

RL batches finish unevenly: most responses end early, a few run to the length cap. Here a tiny Qwen3
(the sampler benchmark's tiny row) samples at temperature 1 with a handful of EOS ids, so row lengths
are roughly geometric with a tail to `--max-new`. Both settings produce the same tokens (asserted);
the JSON reports each one's best wall time over `--repeats` interleaved calls, generated tokens per
second, and the ratio.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from sampler import model_config
from timing import interleaved_best, timed

from polaris_jax.models import init_params
from polaris_jax.sampling import generate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--max-new", type=int, default=1024)
    parser.add_argument("--eos-ids", type=int, default=6, help="how many token ids end a row")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = model_config({"model": "tiny qwen3", "dtype": "float32"})  # the sampler benchmark's tiny model
    params = init_params(config, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(1, config.vocab_size, (args.rows, args.prompt)).tolist()
    kwargs = dict(
        max_new_tokens=args.max_new, temperature=1.0, seed=1, eos_token_ids=tuple(range(10, 10 + args.eos_ids))
    )
    run = {
        mode: (lambda mode=mode: generate(config, params, prompts, compact_rows=mode, **kwargs))
        for mode in (True, False)
    }
    outputs = {mode: fn() for mode, fn in run.items()}  # warm-up (compiles)
    assert outputs[True].tokens == outputs[False].tokens, "compaction changed the samples"
    best = interleaved_best({mode: (lambda fn=fn: timed(fn)) for mode, fn in run.items()}, args.repeats)
    lengths = np.array([len(t) for t in outputs[True].tokens])
    print(
        json.dumps(
            dict(
                rows=args.rows,
                max_new_tokens=args.max_new,
                mean_length=round(float(lengths.mean()), 1),
                median_length=float(np.median(lengths)),
                max_length=int(lengths.max()),
                compact_s=round(best[True], 3),
                full_batch_s=round(best[False], 3),
                compact_tok_s=round(lengths.sum() / best[True], 1),
                full_batch_tok_s=round(lengths.sum() / best[False], 1),
                speedup=round(best[False] / best[True], 2),
                device=jax.devices()[0].device_kind,
            )
        )
    )


if __name__ == "__main__":
    main()
