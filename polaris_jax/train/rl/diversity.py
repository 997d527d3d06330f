"""Rollout diversity (Distinct-N) and the Polaris temperature search built on it.

Distinct-N (Li et al. 2016) is the number of unique n-grams divided by the total number of
n-grams over a set of responses; Polaris uses Distinct-4 over the rollouts of one prompt
to measure how different the samples of a group are.

Temperature search. Polaris's blog ("diversity-based rollout sampling") samples each
problem at a grid of temperatures and reads off three zones: a robust zone where accuracy
barely moves, a controlled-exploration zone where accuracy dips slightly while diversity
keeps rising, and a collapse zone where accuracy falls fast. It starts RL at a temperature
in the controlled-exploration zone (Qwen3-4B: 1.4) and raises it each stage as training
lowers diversity. Our rule, documented in `choose_temperature`, makes that concrete:
among temperatures whose accuracy is within `accuracy_tolerance` of the best one, take the
lowest that reaches `diversity_target` if one is given, else the highest (the most diverse
temperature that has not yet started to collapse). The tolerance and target are ours to
set; the Polaris scripts that compute its choice are not something we reproduce here.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

TokenList = Sequence[int]


def ngrams(tokens: TokenList, n: int) -> list[tuple]:
    tokens = list(tokens)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(responses: Sequence[TokenList], n: int = 4) -> float:
    """Unique n-grams / total n-grams over all responses (n-grams never cross a response
    boundary). 0.0 when the responses hold no n-gram at all."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts: Counter = Counter()
    for response in responses:
        counts.update(ngrams(response, n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def distinct_4(responses: Sequence[TokenList]) -> float:
    return distinct_n(responses, 4)


def group_distinct_n(responses: Sequence[TokenList], group_size: int, n: int = 4) -> float:
    """Mean over prompts of Distinct-N within each prompt's group (group-major layout)."""
    if group_size < 1 or len(responses) % group_size:
        raise ValueError(f"{len(responses)} responses do not split into groups of {group_size}")
    if not responses:
        raise ValueError("no responses")
    scores = [distinct_n(responses[i : i + group_size], n) for i in range(0, len(responses), group_size)]
    return float(np.mean(scores))


@dataclasses.dataclass(frozen=True)
class TemperatureScan:
    temperature: float
    diversity: float  # mean per-prompt Distinct-N
    accuracy: float
    num_responses: int


@dataclasses.dataclass(frozen=True)
class TemperatureSearchResult:
    chosen_temperature: float
    scans: tuple[TemperatureScan, ...]
    rule: str


def choose_temperature(
    scans: Sequence[TemperatureScan],
    *,
    accuracy_tolerance: float = 0.03,
    diversity_target: float | None = None,
) -> tuple[float, str]:
    """Returns (temperature, the rule that picked it). See the module docstring."""
    if not scans:
        raise ValueError("no temperatures scanned")
    best_accuracy = max(s.accuracy for s in scans)
    stable = sorted(
        (s for s in scans if s.accuracy >= best_accuracy - accuracy_tolerance),
        key=lambda s: s.temperature,
    )
    if diversity_target is not None:
        for s in stable:
            if s.diversity >= diversity_target:
                return s.temperature, (
                    f"lowest temperature with accuracy within {accuracy_tolerance} of the best "
                    f"({best_accuracy:.4f}) and diversity >= {diversity_target}"
                )
    return stable[-1].temperature, (
        f"highest temperature with accuracy within {accuracy_tolerance} of the best "
        f"({best_accuracy:.4f})" + ("" if diversity_target is None else f"; none reached diversity {diversity_target}")
    )


def search_temperature(
    sample_fn: Callable[[float], tuple[Sequence[TokenList], Sequence[bool]]],
    temperatures: Sequence[float],
    *,
    group_size: int,
    n: int = 4,
    accuracy_tolerance: float = 0.03,
    diversity_target: float | None = None,
) -> TemperatureSearchResult:
    """Scans `temperatures`. `sample_fn(t)` returns (responses, correct): `group_size`
    responses per prompt, group-major, as token lists, and one bool per response."""
    if not temperatures:
        raise ValueError("temperature grid is empty")
    scans = []
    for temperature in temperatures:
        responses, correct = sample_fn(float(temperature))
        if len(responses) != len(correct):
            raise ValueError(
                f"sample_fn({temperature}) gave {len(responses)} responses but {len(correct)} correctness flags"
            )
        scans.append(
            TemperatureScan(
                temperature=float(temperature),
                diversity=group_distinct_n(responses, group_size, n),
                accuracy=float(np.mean(np.asarray(correct, dtype=np.float64))),
                num_responses=len(responses),
            )
        )
    chosen, rule = choose_temperature(scans, accuracy_tolerance=accuracy_tolerance, diversity_target=diversity_target)
    return TemperatureSearchResult(chosen_temperature=chosen, scans=tuple(scans), rule=rule)
