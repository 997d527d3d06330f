"""Pulling the final answer out of a model completion.

Every function here is plain string work, linear in the completion length, so it is safe
to run on hostile text (megabyte completions, thousands of unclosed boxes) in any process.

Order of preference: the last `\\boxed{...}` / `\\fbox{...}` (math-verify takes the first,
which rewards a model for hedging early); then GSM8K's `#### N`; then, if enabled, the last
"the answer is ..." sentence. A box left unclosed in the answer region is malformed output
and yields no answer rather than a fall back to an earlier box.
"""

from __future__ import annotations

import dataclasses
import re

from polaris_jax.data.latex_box import Extraction, last_boxed  # noqa: F401 (re-exported)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINK_POLICIES = ("strip", "require", "ignore")
THINK_POLICY_CHOICES = ("auto",) + THINK_POLICIES  # what a config may name

_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]+)")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)
# What follows "the answer is": up to a sentence end (a period followed by space or end,
# so decimals survive) or a newline.
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")


@dataclasses.dataclass(frozen=True)
class ExtractionConfig:
    """How to find the final answer in a completion.

    think: "strip" searches only after the last `</think>` when there is one, and finds no
      answer while a `<think>` is still open; "require" additionally needs a `</think>`
      (Polaris/DeepScaleR: no finished reasoning, no reward); "ignore" searches everything.
    hash_answer: accept GSM8K's `#### N` when there is no box.
    answer_is_fallback: accept "the answer is X" when there is neither.
    max_answer_chars: longer extracted answers are treated as no answer; real final answers
      are short, and the symbolic parser is superlinear in input length.
    """

    think: str = "strip"
    hash_answer: bool = True
    answer_is_fallback: bool = True
    max_answer_chars: int = 1000

    def __post_init__(self):
        if self.think not in THINK_POLICIES:
            raise ValueError(f"think policy must be one of {THINK_POLICIES}, got {self.think!r}")
        if self.max_answer_chars <= 0:
            raise ValueError(f"max_answer_chars must be positive, got {self.max_answer_chars}")


def resolve_think_policy(policy: str, prompt_text: str) -> str:
    """The think policy for completions of `prompt_text` (a rendered prompt). "auto" means "require" when
    the prompt itself opens the think block (the R1 template, or force_think): the completion is reasoning
    until `</think>`, so a truncated one has no answer. Otherwise "strip" (the model opens and closes its
    own `<think>`, and an answer counts only after the close). Training, the in-loop evaluation and the
    eval job all resolve it here, so they score a completion the same way."""
    if policy not in THINK_POLICY_CHOICES:
        raise ValueError(f"think policy must be one of {THINK_POLICY_CHOICES}, got {policy!r}")
    if policy != "auto":
        return policy
    return "require" if prompt_text.rstrip().endswith(THINK_OPEN) else "strip"


def answer_region(completion: str, think: str) -> str | None:
    """The part of the completion that may hold the final answer, or None if none may."""
    if think not in THINK_POLICIES:
        raise ValueError(f"think policy must be one of {THINK_POLICIES}, got {think!r}")
    if think == "ignore":
        return completion
    close_at = completion.rfind(THINK_CLOSE)
    if close_at >= 0:
        return completion[close_at + len(THINK_CLOSE) :]
    if think == "require" or THINK_OPEN in completion:
        return None
    return completion


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    found = None
    for found in pattern.finditer(text):  # noqa: B007 - the loop keeps the last match
        pass
    return found


def hash_answer(text: str) -> str | None:
    """The text after the last GSM8K `####` marker, or None."""
    found = _last_match(_HASH_ANSWER, text)
    if found is None:
        return None
    answer = found.group(1).strip().rstrip(".").strip()
    return answer or None


def answer_is(text: str) -> str | None:
    """What follows the last "the (final) answer is", up to the sentence end, or None."""
    found = _last_match(_ANSWER_IS, text)
    if found is None:
        return None
    rest = text[found.end() :]
    end = _SENTENCE_END.search(rest)
    answer = (rest[: end.start()] if end else rest).strip()
    answer = answer.strip("$").strip()
    return answer or None


def extract_answer(completion: str, config: ExtractionConfig = ExtractionConfig()) -> Extraction:
    """The final answer of `completion` under `config`, with where it came from."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    region = answer_region(completion, config.think)
    if region is None:
        reason = "no_think_close" if config.think == "require" else "unfinished_think"
        return Extraction(None, reason)
    found = last_boxed(region)
    if found.source == "no_box":
        answer = hash_answer(region) if config.hash_answer else None
        if answer is not None:
            found = Extraction(answer, "hash")
        elif config.answer_is_fallback and (answer := answer_is(region)) is not None:
            found = Extraction(answer, "answer_is")
        else:
            found = Extraction(None, "no_answer")
    if found.answer is not None:
        if not found.answer:
            return Extraction(None, "empty_answer")
        if len(found.answer) > config.max_answer_chars:
            return Extraction(None, "answer_too_long")
    return found
