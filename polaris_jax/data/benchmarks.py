"""Math benchmark files normalised to `{"id", "problem", "answer"}`, and the prompt for them.

The package ships nine public benchmarks in `polaris_jax/data/benchmark_files/` (AIME 2024/25,
HMMT 2025, MATH-500, AMC23, GSM8K, Minerva, Polaris' AIME parquets; sources, row counts and
licences in its README.md); `load_benchmark("aime_2025")` loads one by name (its file stem, see
`benchmark_names()`), and `load_benchmark(path)` any file of the layouts below.

Every layout loads the same way, whatever its field names and answer types:

    * `{problem|question, answer}` with `answer` a string, an int or a float (AIME, HMMT,
      MATH-500, AMC); integer-valued floats become "27", not "27.0";
    * GSM8K: `answer` is a worked solution ending in `#### N`; the gold is N without
      thousands separators;
    * Minerva: no `answer`, the gold is the last `\\boxed{}` of `solution`;
    * verl / Polaris parquet: `prompt` is a chat (the problem is the user turn, with the
      dataset's own instruction suffix removed) and the gold is `reward_model.ground_truth`;
    * a prepared tfds directory (array_record `data_source`) or `tfds:NAME` holding any of
      the above.

Ids are strings: the row's `id`, `idx`, `unique_id` or `extra_info.index`, else its index.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from polaris_jax.data import sources
from polaris_jax.data.latex_box import last_boxed

R1_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# Instructions that benchmark files append to the problem themselves; stripped on load so
# every benchmark is prompted with the same instruction.
_EMBEDDED_INSTRUCTIONS = (
    "Let's think step by step and output the final answer within \\boxed{}.",
    R1_MATH_INSTRUCTION,
)
_ID_KEYS = ("id", "idx", "unique_id")
_PROBLEM_KEYS = ("problem", "question")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_BENCHMARK_SUFFIXES = (".jsonl", ".parquet")


def _benchmark_dir():
    return importlib.resources.files("polaris_jax.data") / "benchmark_files"


def benchmark_names() -> list[str]:
    """Names of the benchmarks shipped with the package (file stems), for `load_benchmark(name)`."""
    files = _benchmark_dir().iterdir()
    return sorted(f.name.rsplit(".", 1)[0] for f in files if f.name.endswith(_BENCHMARK_SUFFIXES))


def benchmark_file(name: str):
    """The shipped file of benchmark `name` (a `pathlib.Path` when the package is installed as files)."""
    for suffix in _BENCHMARK_SUFFIXES:
        candidate = _benchmark_dir() / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"unknown benchmark {name!r}: not a file, and not one of the shipped benchmarks "
        f"({', '.join(benchmark_names())})"
    )


def _plain(value: Any) -> Any:
    """tfds rows hold bytes and numpy scalars; turn them into str / int / float."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _plain(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value


def answer_to_str(value: Any) -> str:
    """A gold answer of any stored type as the string the verifier compares against."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"gold answer must be a string or a number, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"gold answer is {value}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("gold answer is empty")
        return text
    raise ValueError(f"gold answer must be a string or a number, got {type(value).__name__}")


def gsm8k_answer(solution: str) -> str:
    """N from a GSM8K solution ending in `#### N`, thousands separators removed."""
    _, marker, tail = solution.rpartition("####")
    if not marker:
        raise ValueError("GSM8K-style answer has no '#### N' line")
    answer = tail.strip()
    return answer.replace(",", "") if _THOUSANDS.match(answer) else answer


def _strip_instruction(problem: str) -> str:
    text = problem.strip()
    for instruction in _EMBEDDED_INSTRUCTIONS:
        if text.endswith(instruction):
            return text[: -len(instruction)].rstrip()
    return text


def _chat_problem(messages: list) -> str:
    users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
    if not users:
        raise ValueError("chat prompt has no user turn")
    return _strip_instruction(str(users[-1]["content"]))


def normalize_row(row: Mapping[str, Any], index: int) -> dict[str, str]:
    """One raw benchmark row -> {"id", "problem", "answer"} (all strings)."""
    row = _plain(dict(row))
    problem = next((row[k] for k in _PROBLEM_KEYS if isinstance(row.get(k), str)), None)
    if problem is None and isinstance(row.get("prompt"), list):
        problem = _chat_problem(row["prompt"])
    elif problem is None and isinstance(row.get("prompt"), str):
        problem = _strip_instruction(row["prompt"])
    if not problem or not problem.strip():
        raise ValueError(f"no problem text (looked for {', '.join(_PROBLEM_KEYS)}, prompt)")

    reward_model = row.get("reward_model")
    if isinstance(reward_model, Mapping) and reward_model.get("ground_truth") is not None:
        answer = answer_to_str(reward_model["ground_truth"])
    elif isinstance(row.get("answer"), str) and "####" in row["answer"]:
        answer = gsm8k_answer(row["answer"])
    elif row.get("answer") is not None:
        answer = answer_to_str(row["answer"])
    elif isinstance(row.get("solution"), str):
        # The same box parser the reward uses, so gold and prediction are read the same way.
        answer = last_boxed(row["solution"]).answer
        if not answer:
            raise ValueError("no answer field and no balanced \\boxed{} in the solution")
    else:
        raise ValueError("no gold answer (looked for reward_model.ground_truth, answer, solution)")

    row_id = next((row[k] for k in _ID_KEYS if row.get(k) is not None), None)
    extra = row.get("extra_info")
    if row_id is None and isinstance(extra, Mapping) and extra.get("index") is not None:
        row_id = extra["index"]
    return {"id": str(index if row_id is None else row_id), "problem": problem.strip(), "answer": answer}


def _open(path: str, split: str | None) -> sources.RowSource:
    location = Path(path)
    if location.is_dir() and (location / "dataset_info.json").exists():
        return sources.TfdsSource(str(location), split=split or _only_split(location))
    if path.startswith("tfds:"):
        return sources.TfdsSource(path[len("tfds:") :], split=split or "test")
    if not location.exists():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    return sources.open_source(str(location))


def _only_split(directory: Path) -> str:
    info = json.loads((directory / "dataset_info.json").read_text())
    names = [s["name"] for s in info.get("splits", [])]
    if len(names) == 1:
        return names[0]
    if "test" in names:
        return "test"
    raise ValueError(f"{directory} has splits {names}; pass split= to choose one")


def _is_name(spec: str | os.PathLike) -> bool:
    """A bare string such as "aime_2025" that is not an existing path names a shipped benchmark."""
    return (
        isinstance(spec, str)
        and not spec.startswith("tfds:")
        and not os.path.exists(spec)
        and not any(sep in spec for sep in ("/", os.sep))
        and not os.path.splitext(spec)[1]
    )


def load_benchmark(name_or_path: str | os.PathLike, split: str | None = None) -> list[dict[str, str]]:
    """Every row of a benchmark as {"id", "problem", "answer"}, answers as strings.

    `name_or_path` is the name of a shipped benchmark (`benchmark_names()`: "aime_2025",
    "math500", ...), a .jsonl/.json or .parquet file, a prepared tfds directory, or `tfds:NAME`.
    A bare name without a suffix is looked up among the shipped files unless a path of that name
    exists. `split` picks a tfds split (default: the only one, else "test").
    """
    if _is_name(name_or_path):
        with importlib.resources.as_file(benchmark_file(name_or_path)) as path:
            return _load(os.fspath(path), split, label=name_or_path)
    path = os.fspath(name_or_path)
    return _load(path, split, label=path)


def _load(path: str, split: str | None, label: str) -> list[dict[str, str]]:
    source = _open(path, split)
    rows = []
    for index in range(len(source)):
        try:
            rows.append(normalize_row(source[index], index))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{label}: row {index}: {error}") from None
    if not rows:
        raise ValueError(f"{label}: no rows")
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        if row["id"] in seen:
            raise ValueError(f"{label}: rows {seen[row['id']]} and {index} share id {row['id']!r}")
        seen[row["id"]] = index
    return rows


def build_math_prompt(
    problem: str,
    tokenizer_or_template: Any,
    force_think: bool = False,
    *,
    instruction: str = R1_MATH_INSTRUCTION,
    **template_kwargs: Any,
) -> str:
    """The prompt text for one problem: a user turn `problem\\ninstruction` rendered through
    the checkpoint's chat template with the generation prompt opened.

    `tokenizer_or_template` is anything with `apply_chat_template(messages,
    add_generation_prompt=True)` (our Tokenizer, a transformers tokenizer), a jinja template
    string, or a built-in template name ("qwen3", "r1_distill_qwen"). `force_think` makes
    the prompt end in `<think>\\n` so the model starts inside its reasoning block (the R1
    template already does this).
    """
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("problem must be a non-empty string")
    content = f"{problem.strip()}\n{instruction}" if instruction else problem.strip()
    messages = [{"role": "user", "content": content}]
    if hasattr(tokenizer_or_template, "apply_chat_template"):
        text = tokenizer_or_template.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
    elif isinstance(tokenizer_or_template, str):
        from polaris_jax.data import chat_template

        template = tokenizer_or_template
        if template in chat_template.BUILTIN_TEMPLATES:
            template = chat_template.builtin_template(template)
        text = chat_template.render_chat_template(template, messages, add_generation_prompt=True, **template_kwargs)
    else:
        raise TypeError(
            "tokenizer_or_template must have apply_chat_template() or be a template string, "
            f"got {type(tokenizer_or_template).__name__}"
        )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str (tokenize=False)")
    if force_think and not text.endswith("<think>\n"):
        text += "<think>\n"
    return text
