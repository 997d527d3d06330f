"""RL prompts: a problem file as tokenised prompts, read in a seeded order from a saved position.

The order of epoch e is a permutation drawn from (seed, stage, e), so the prompts of any step are a
pure function of (stage, position): resuming needs only the position, and a run resumed after a
kill reads exactly the prompts the uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from polaris_jax.data import synthetic_arith
from polaris_jax.data.benchmarks import build_math_prompt, load_benchmark

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    prompt_ids: tuple[int, ...]
    answer: str


def load_rows(path: str) -> list[dict[str, str]]:
    """{"id", "problem", "answer"} rows of any layout `data.benchmarks.load_benchmark` reads, or of a
    `synthetic_arith:SPLIT:COUNT` spec."""
    if path.startswith(synthetic_arith.DATASET_PREFIX):
        return synthetic_arith.dataset_records(path)
    return load_benchmark(path)


def prompt_text(problem: str, tokenizer, data_config) -> str:
    """One problem's prompt as the run renders it: the chat template, `data.instruction` and
    `data.template_kwargs` of the config."""
    kwargs = dict(data_config.template_kwargs.to_dict()) if "template_kwargs" in data_config else {}
    return build_math_prompt(problem, tokenizer, instruction=data_config.instruction, **kwargs)


def load_problems(path: str, tokenizer, data_config, rows: list[dict] | None = None) -> list[Problem]:
    """The rows of `path` as prompts; too-long ones are skipped with a warning, and a file with no
    usable prompt is refused."""
    rows = load_rows(path) if rows is None else rows
    texts = [prompt_text(row["problem"], tokenizer, data_config) for row in rows]
    problems, too_long = [], 0
    for row, ids in zip(rows, tokenizer.encode_batch(texts)):
        if len(ids) > data_config.max_prompt_len:
            too_long += 1
            continue
        problems.append(Problem(row["id"], tuple(ids), row["answer"]))
    if too_long:
        logger.warning(
            "%s: skipped %d of %d prompts longer than data.max_prompt_len=%d",
            path,
            too_long,
            len(rows),
            data_config.max_prompt_len,
        )
    if not problems:
        raise ValueError(f"{path}: every prompt is longer than data.max_prompt_len={data_config.max_prompt_len}")
    return problems


class ProblemStream:
    """Problems of one stage in epoch-wise shuffled order; `take(position, count)` never mutates."""

    def __init__(self, problems: list[Problem], *, seed: int, stage: int, shuffle: bool = True):
        if not problems:
            raise ValueError("no problems")
        self.problems = problems
        self._seed, self._stage, self._shuffle = seed, stage, shuffle
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.problems)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.problems)
            rng = np.random.default_rng([self._seed, self._stage, epoch])
            self._orders = {epoch: rng.permutation(n) if self._shuffle else np.arange(n)}
        return self._orders[epoch]

    def take(self, position: int, count: int) -> list[Problem]:
        out = []
        for i in range(position, position + count):
            epoch, j = divmod(i, len(self.problems))
            out.append(self.problems[int(self._order(epoch)[j])])
        return out
