"""Verifications per second: the VerifierPool on 2 workers vs math-verify called in-process.

    python benchmarks/verifier.py [--items 500] [--workers 2]

Workload: MATH-500 gold answers; each problem gets one completion that boxes its own gold
(correct) and one that boxes another problem's gold (wrong, so the full symbolic path runs),
each after ~1.5 KB of reasoning text. Three ways to score the same items, each starting from
cold parse caches:

  direct_math_verify  `verify(parse(gold), parse(completion))` in this process, math-verify's
                      defaults (its signal.alarm timeouts; main thread only);
  in_process          our scorer (`score_completion`) in this process, no isolation;
  pool                `VerifierPool.score` on --workers worker processes, per-item timeout.

Prints one JSON object; `pool_over_direct` is the ratio of the pool's rate to math-verify's.
The rates only mean something on otherwise idle cores: `load_avg_1min` is reported with them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from polaris_jax.data.benchmarks import load_benchmark  # noqa: E402
from polaris_jax.rewards import VerifierPool, equivalence, score_completion  # noqa: E402

MATH500 = "math500"  # shipped in polaris_jax/data/benchmark_files/
FILLER = "Let me work through this step by step, checking each case carefully. " * 22


def workload(limit: int) -> tuple[list[str], list[str], int]:
    """(completions, golds, how many completions box a string-identical gold)."""
    golds = [row["answer"] for row in load_benchmark(MATH500)]
    completions, targets, identical = [], [], 0
    for i, gold in enumerate(golds):
        other = golds[(i + 7) % len(golds)]
        for boxed in (gold, other):
            if len(completions) < limit:
                completions.append(f"<think>\n{FILLER}\n</think>\nTherefore the answer is $\\boxed{{{boxed}}}$.")
                targets.append(gold)
                identical += boxed == gold
    return completions, targets, identical


def clear_caches() -> None:
    import math_verify.parser

    math_verify.parser.parse_latex_cached.cache_clear()
    math_verify.parser.parse_expr_cached.cache_clear()
    equivalence.parse_answer.cache_clear()


def rate(fn, completions, golds) -> tuple[float, float]:
    clear_caches()
    started = time.perf_counter()
    correct = fn(completions, golds)
    elapsed = time.perf_counter() - started
    return len(completions) / elapsed, correct


def direct_math_verify(completions, golds) -> float:
    from math_verify import parse, verify

    hits = 0
    for completion, gold in zip(completions, golds):
        hits += bool(verify(parse("$" + gold + "$"), parse(completion)))
    return hits


def in_process(completions, golds) -> float:
    return sum(score_completion(c, g).reward for c, g in zip(completions, golds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    completions, golds, identical = workload(args.items)

    direct_rate, direct_correct = rate(direct_math_verify, completions, golds)
    inproc_rate, inproc_correct = rate(in_process, completions, golds)
    with VerifierPool(num_workers=args.workers, timeout_s=5.0) as pool:
        pool.score(completions[:4], golds[:4])  # workers started and imported
        pool_rate, pool_correct = rate(lambda c, g: sum(s.reward for s in pool.score(c, g)), completions, golds)
        failures = dict(pool.failures)

    print(
        json.dumps(
            {
                "benchmark": "verifier",
                "items": len(completions),
                "cpu_count": os.cpu_count(),
                "load_avg_1min": os.getloadavg()[0],
                "pool_workers": args.workers,
                "direct_math_verify_per_s": round(direct_rate, 1),
                "in_process_per_s": round(inproc_rate, 1),
                "pool_per_s": round(pool_rate, 1),
                "pool_over_direct": round(pool_rate / direct_rate, 2),
                "pool_over_in_process": round(pool_rate / inproc_rate, 2),
                "correct": {"direct_math_verify": direct_correct, "in_process": inproc_correct, "pool": pool_correct},
                "boxed_gold_itself": identical,
                "pool_failures": failures,
            }
        )
    )


if __name__ == "__main__":
    main()
