"""A synthetic multi-step arithmetic task for CPU demos and learning tests.

A problem is a left-to-right chain of single-digit additions and subtractions, e.g. `7+5-3+8`,
whose running value stays in [0, max_value]. The model answers in the reasoning format of
Qwen3 / R1 checkpoints:

    <think>
    7+5=12
    12-3=9
    9+8=17
    </think>

    \\boxed{17}

SFT traces are deliberately imperfect so that supervised warm-starting leaves headroom that
only reward can remove (the demo must show RL doing its job, not SFT):
  * `correct`: every step right;
  * `slip`: one step is off by 1 or 2 and later steps carry the wrong value on (a careless
    solver; the final answer is wrong);
  * `skip`: one operation is forgotten (every line is right arithmetic, the procedure is not);
  * `lazy`: an empty think block and a guessed answer (a solver that skips the work).
A policy fitted to such a mixture is right about as often as the share of correct traces;
GRPO, rewarded by the math verifier, learns to always do the work and to take every step. The
demo uses `skip` rather than `slip` noise: its arithmetic lines are all true, so a short SFT learns
the arithmetic cleanly and the headroom lies in the procedure, which is what the reward can fix.

The tokenizer is a real `tokenizers` tokenizer.json (one token per character, plus the chat
and reasoning markers as added tokens), saved and loaded like any checkpoint tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from polaris_jax.data import chat_template as chat_template_lib
from polaris_jax.data.tokenizer import Tokenizer

TRACE_KINDS = ("correct", "slip", "skip", "lazy")
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_WORD_TOKENS = ("<think>", "</think>", "\\boxed{", "user", "assistant", "system")
_CHARS = tuple("0123456789+-*=()}{ \n")


@dataclasses.dataclass(frozen=True)
class ArithTask:
    """Which problems exist: operand count range, operand size and the running-value bound."""

    min_operands: int = 3
    max_operands: int = 4
    max_operand: int = 9
    max_value: int = 99
    ops: str = "+-"

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(f"need 2 <= min_operands <= max_operands, got {self.min_operands}, {self.max_operands}")
        if not 1 <= self.max_operand <= 9:
            raise ValueError(f"max_operand must be a digit in [1, 9], got {self.max_operand}")
        if set(self.ops) - set("+-") or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of '+-', got {self.ops!r}")


@dataclasses.dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def text(self) -> str:
        return str(self.operands[0]) + "".join(op + str(x) for op, x in zip(self.ops, self.operands[1:]))

    def running_values(self) -> list[int]:
        values = [self.operands[0]]
        for op, x in zip(self.ops, self.operands[1:]):
            values.append(values[-1] + x if op == "+" else values[-1] - x)
        return values

    @property
    def answer(self) -> int:
        return self.running_values()[-1]


def sample_problem(rng: np.random.Generator, task: ArithTask) -> Problem:
    """One problem; redraws until every running value lies in [0, max_value]."""
    while True:
        count = int(rng.integers(task.min_operands, task.max_operands + 1))
        operands = tuple(int(x) for x in rng.integers(1, task.max_operand + 1, size=count))
        ops = tuple(task.ops[int(i)] for i in rng.integers(0, len(task.ops), size=count - 1))
        problem = Problem(operands, ops)
        if all(0 <= v <= task.max_value for v in problem.running_values()):
            return problem


def sample_problems(seed: int, count: int, task: ArithTask, *, exclude: Sequence[str] = ()) -> list[Problem]:
    """`count` distinct problems whose text is not in `exclude` (held-out splits stay disjoint)."""
    rng = np.random.default_rng(seed)
    seen = set(exclude)
    out, misses = [], 0
    while len(out) < count:
        problem = sample_problem(rng, task)
        if problem.text in seen:
            misses += 1
            if misses > 20_000:  # many draws in a row found nothing new: the space is used up
                raise ValueError(f"could not draw {count} distinct problems from {task} (the task has too few)")
            continue
        misses = 0
        seen.add(problem.text)
        out.append(problem)
    return out


def _steps_text(operands, ops, values) -> str:
    return "".join(f"{prev}{op}{x}={v}\n" for prev, op, x, v in zip(values[:-1], ops, operands[1:], values[1:]))


def trace_text(problem: Problem, kind: str, rng: np.random.Generator, *, task: ArithTask = ArithTask()) -> str:
    """The assistant's completion (without the end-of-turn token) for one trace kind."""
    if kind == "correct":
        values = problem.running_values()
    elif kind == "slip":
        values = [problem.operands[0]]
        slip_at = int(rng.integers(1, len(problem.operands)))
        for i, (op, x) in enumerate(zip(problem.ops, problem.operands[1:]), start=1):
            value = values[-1] + x if op == "+" else values[-1] - x
            if i == slip_at:
                offsets = [d for d in (-2, -1, 1, 2) if 0 <= value + d <= task.max_value]
                value += offsets[int(rng.integers(len(offsets)))]
            values.append(value)
    elif kind == "skip":
        drop = int(rng.integers(1, len(problem.operands)))
        kept = [i for i in range(1, len(problem.operands)) if i != drop]
        operands = (problem.operands[0],) + tuple(problem.operands[i] for i in kept)
        ops = tuple(problem.ops[i - 1] for i in kept)
        shortened = Problem(operands, ops)
        if all(0 <= v <= task.max_value for v in shortened.running_values()):
            values = shortened.running_values()
            steps = _steps_text(operands, ops, values)
            return f"<think>\n{steps}</think>\n\n\\boxed{{{values[-1]}}}"
        values = problem.running_values()  # dropping that step leaves the task's range: no slip then
    elif kind == "lazy":
        guess = int(rng.integers(0, task.max_operands * task.max_operand + 1))
        return f"<think>\n\n</think>\n\n\\boxed{{{guess}}}"
    else:
        raise ValueError(f"trace kind {kind!r} is not one of {TRACE_KINDS}")
    return f"<think>\n{_steps_text(problem.operands, problem.ops, values)}</think>\n\n\\boxed{{{values[-1]}}}"


def sft_traces(
    problems: Sequence[Problem], mix: dict[str, float], seed: int, task: ArithTask = ArithTask()
) -> list[tuple[Problem, str, str]]:
    """(problem, kind, completion) per problem, the kind drawn from `mix` (weights over TRACE_KINDS)."""
    unknown = set(mix) - set(TRACE_KINDS)
    if unknown:
        raise ValueError(f"unknown trace kinds {sorted(unknown)}; choose from {TRACE_KINDS}")
    kinds = list(mix)
    weights = np.asarray([mix[k] for k in kinds], np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"trace mix weights must be >= 0 with a positive sum, got {mix}")
    rng = np.random.default_rng(seed)
    out = []
    for problem in problems:
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        out.append((problem, kind, trace_text(problem, kind, rng, task=task)))
    return out


# ---------------------------------------------------------------------------------- tokenizer


def build_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Writes the task's tokenizer (tokenizer.json + tokenizer_config.json) and loads it back."""
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS + _CHARS)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in _WORD_TOKENS])
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
        "chat_template": chat_template_lib.builtin_template("qwen3"),
    }
    Tokenizer(backend, config).save(directory)
    return Tokenizer.from_dir(directory)


def prompt_text(tokenizer: Tokenizer, problem: Problem) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": problem.text}], add_generation_prompt=True)


def padded_vocab_size(tokenizer: Tokenizer, multiple: int = 8) -> int:
    return -(-tokenizer.vocab_size // multiple) * multiple


def problems_as_records(problems: Sequence[Problem]) -> Iterator[dict]:
    """Dataset records in the RL data format: {"problem": ..., "answer": ...} (answer as a string)."""
    for problem in problems:
        yield {"problem": problem.text, "answer": str(problem.answer)}


# ------------------------------------------------------------------------------ dataset specs

DATASET_PREFIX = "synthetic_arith:"
_SPLIT_SEEDS = {"eval": 1, "train": 2}
_HELD_OUT = 1024  # the first eval problems, never drawn for train


def dataset_records(spec: str, task: ArithTask = ArithTask()) -> list[dict]:
    """`synthetic_arith:SPLIT:COUNT` (SPLIT train or eval) as {"id", "problem", "answer"} rows, so any
    RL config can name the task without files. Train never holds one of the first 1024 eval problems."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] + ":" != DATASET_PREFIX or parts[1] not in _SPLIT_SEEDS or not parts[2].isdigit():
        raise ValueError(
            f"bad synthetic dataset {spec!r}; expected {DATASET_PREFIX}train:COUNT or {DATASET_PREFIX}eval:COUNT"
        )
    split, count = parts[1], int(parts[2])
    exclude = () if split == "eval" else [p.text for p in sample_problems(_SPLIT_SEEDS["eval"], _HELD_OUT, task)]
    problems = sample_problems(_SPLIT_SEEDS[split], count, task, exclude=exclude)
    return [{"id": f"{split}-{i}", **record} for i, record in enumerate(problems_as_records(problems))]
