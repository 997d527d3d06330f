"""Shape buckets: every array the sampler compiles for has a length drawn from a small fixed set."""

from __future__ import annotations

import dataclasses


def _geometric(minimum: int, growth: int):
    size = minimum
    while True:
        yield size
        size *= growth


def round_up(value: int, sizes: tuple[int, ...] | None, minimum: int, growth: int = 2, multiple: int = 1) -> int:
    """The smallest bucket >= value (explicit `sizes`, else minimum·growth^k), then a multiple of `multiple`."""
    if value < 1:
        raise ValueError(f"cannot bucket a size of {value}")
    candidates = sorted(sizes) if sizes else _geometric(minimum, growth)
    for size in candidates:
        if size >= value:
            return -(-size // multiple) * multiple
    raise ValueError(f"size {value} exceeds the largest bucket {max(sizes)}; add a larger bucket")


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Bucket sets; None means powers of two from the minimum.

    prompt_lengths: the width prompts are left-padded to.
    batch_sizes: the prefill batch (distinct prompts) and the decode batch (prompts × n) are padded
      with dummy rows to one of these.
    cache_lengths: the KV cache grows through these; decode attends over the current bucket only, so
      attention reads at most `growth` times the filled length.
    """

    prompt_lengths: tuple[int, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    cache_lengths: tuple[int, ...] | None = None
    min_prompt_length: int = 16
    min_batch_size: int = 1
    min_cache_length: int = 64
    growth: int = 2

    def __post_init__(self):
        if self.growth < 2:
            raise ValueError(f"growth={self.growth} must be >= 2")
        for name in ("prompt_lengths", "batch_sizes", "cache_lengths"):
            sizes = getattr(self, name)
            if sizes is not None and (not sizes or min(sizes) < 1):
                raise ValueError(f"{name}={sizes} must be a non-empty tuple of positive sizes")

    def prompt_length(self, length: int) -> int:
        return round_up(length, self.prompt_lengths, self.min_prompt_length, self.growth)

    def batch_size(self, rows: int, multiple: int = 1) -> int:
        return round_up(rows, self.batch_sizes, self.min_batch_size, self.growth, multiple)

    def cache_length(self, slots: int) -> int:
        return round_up(slots, self.cache_lengths, self.min_cache_length, self.growth)
