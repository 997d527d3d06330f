"""Timing helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so importable)."""

from __future__ import annotations

import time


def timed(fn) -> float:
    """Wall seconds of one call of fn()."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_best(sides: dict, repeats: int) -> dict:
    """Best time of each side over `repeats` rounds; a round calls every side once, in turn, so the
    machine's drifting speed (2x over minutes on a shared VM) hits every side alike. Each side is a
    zero-argument callable returning its own seconds (wrap plain calls with `timed`)."""
    best = {name: float("inf") for name in sides}
    for _ in range(repeats):
        for name, call in sides.items():
            best[name] = min(best[name], call())
    return best
