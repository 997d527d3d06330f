"""Chat SFT examples from jsonl, parquet and tfds `data_source` (array_record) files.

Every source is random access (`len(src)`, `src[i]` -> raw row dict), so grain can shuffle,
order by difficulty and resume by index. `parse_row` turns a raw row into the one example
layout the pipeline uses:

    {"messages": [{"role": ..., "content": ...}, ...], "difficulty": float | None}

Accepted row layouts:
  * `{"messages": [{"role", "content"}, ...]}` (extra message keys such as
    `reasoning_content` are kept; tfds' dict-of-lists `{"role": [...], "content": [...]}` too);
  * `{"prompt": str, "response": str}` -> a user turn and an assistant turn;
plus an optional difficulty field (number, numeric string, or a named level).

A malformed row raises `MalformedRowError`, whose message names the source and row index.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ROLES = ("system", "user", "assistant", "tool")


class MalformedRowError(ValueError):
    """A row that is not a chat example; `row` is its index in the source."""

    def __init__(self, source: str, row: int, reason: str):
        super().__init__(f"{source}: row {row}: {reason}")
        self.source, self.row, self.reason = source, row, reason


class RowSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


def _check_index(src: RowSource, index: int) -> int:
    index = int(index)
    if not 0 <= index < len(src):
        raise IndexError(f"{src.name}: row {index} out of range [0, {len(src)})")
    return index


class JsonlSource:
    """One JSON object per non-blank line, read lazily through a line-offset index."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"jsonl source {self.path} does not exist")
        self.name = str(self.path)
        starts, ends, line_numbers = [], [], []
        offset = 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    starts.append(offset)
                    ends.append(offset + len(line))
                    line_numbers.append(line_no)
                offset += len(line)
        self._starts = np.asarray(starts, np.int64)
        self._ends = np.asarray(ends, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        index = _check_index(self, index)
        start, end = int(self._starts[index]), int(self._ends[index])
        with open(self.path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        line = int(self._line_numbers[index])
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MalformedRowError(self.name, index, f"line {line} is not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise MalformedRowError(self.name, index, f"line {line} is a JSON {type(row).__name__}, not an object")
        return row


class ParquetSource:
    """A parquet file read with pyarrow (memory-mapped); rows come back as python dicts."""

    def __init__(self, path: str | os.PathLike):
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"parquet source {self.path} does not exist")
        self.name = str(self.path)
        self._table = pq.read_table(str(self.path), memory_map=True)

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        index = _check_index(self, index)
        return self._table.slice(index, 1).to_pylist()[0]


class TfdsSource:
    """`tfds.data_source` over array_record files: a registered dataset name or a prepared dir."""

    def __init__(self, name_or_dir: str, *, split: str = "train", data_dir: str | None = None):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        self.name = f"tfds:{name_or_dir}[{split}]"
        if Path(name_or_dir).is_dir():
            builder = tfds.builder_from_directory(name_or_dir)
            self._source = builder.as_data_source(split=split)
        else:
            self._source = tfds.data_source(name_or_dir, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        return self._source[_check_index(self, index)]


class ConcatSource:
    """Several sources read as one; errors still name the original source and its row."""

    def __init__(self, sources: Sequence[RowSource]):
        if not sources:
            raise ValueError("no data sources given")
        self.sources = list(sources)
        self.name = " + ".join(s.name for s in self.sources)
        self._ends = list(np.cumsum([len(s) for s in self.sources]))

    def __len__(self) -> int:
        return int(self._ends[-1])

    def locate(self, index: int) -> tuple[RowSource, int]:
        index = _check_index(self, index)
        k = bisect.bisect_right(self._ends, index)
        return self.sources[k], index - (int(self._ends[k - 1]) if k else 0)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        src, local = self.locate(index)
        return src[local]


def open_source(spec: str, *, split: str = "train", data_dir: str | None = None) -> RowSource:
    """`x.jsonl` / `x.json`, `x.parquet`, `tfds:NAME` or a prepared tfds builder directory."""
    if spec.startswith("tfds:"):
        return TfdsSource(spec[len("tfds:") :], split=split, data_dir=data_dir)
    path = Path(spec)
    if path.is_dir() and (path / "dataset_info.json").exists():
        return TfdsSource(spec, split=split)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return JsonlSource(path)
    if suffix == ".parquet":
        return ParquetSource(path)
    raise ValueError(
        f"cannot tell the format of data source {spec!r}: use a .jsonl/.json or .parquet file, "
        "'tfds:NAME', or a prepared tfds dataset directory"
    )


def open_sources(specs: str | Sequence[str], **kwargs) -> RowSource:
    specs = [specs] if isinstance(specs, str) else list(specs)
    sources = [open_source(s, **kwargs) for s in specs]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


# ----------------------------------------------------------------------------------- rows


def _text(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not valid UTF-8") from e
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _text(value.item(), what)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, Mapping):  # tfds Sequence feature: {"role": [...], "content": [...]}
        columns = {k: list(v) for k, v in value.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"messages columns have different lengths: { {k: len(v) for k, v in columns.items()} }")
        value = [{k: columns[k][i] for k in columns} for i in range(lengths.pop())]
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"'messages' must be a list of {{role, content}} dicts, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} is a {type(message).__name__}, not a dict")
        if "role" not in message or "content" not in message:
            raise ValueError(f"message {i} needs 'role' and 'content', has {sorted(message)}")
        role = _text(message["role"], f"message {i} role")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r} (expected one of {ROLES})")
        out = {k: v for k, v in message.items() if v is not None}
        out["role"] = role
        out["content"] = _text(message["content"], f"message {i} content")
        for key in ("reasoning_content",):
            if key in out:
                out[key] = _text(out[key], f"message {i} {key}")
        messages.append(out)
    return messages


def _difficulty(value: Any, levels: Sequence[str] | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bytes, str)):
        text = _text(value, "difficulty").strip()
        if levels and text in levels:
            return float(list(levels).index(text))
        try:
            value = float(text)
        except ValueError as e:
            hint = f" (known levels: {list(levels)})" if levels else " (set difficulty_levels for named levels)"
            raise ValueError(f"difficulty {text!r} is not a number{hint}") from e
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"difficulty {value!r} is not a number") from e
    if not np.isfinite(value):
        raise ValueError(f"difficulty {value!r} is not finite")
    return value


def parse_row(
    row: Mapping[str, Any],
    *,
    messages_key: str = "messages",
    prompt_key: str = "prompt",
    response_key: str = "response",
    difficulty_key: str = "difficulty",
    difficulty_levels: Sequence[str] | None = None,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Raw row -> {"messages", "difficulty"}; raises ValueError saying what is wrong."""
    if not isinstance(row, Mapping):
        raise ValueError(f"row is a {type(row).__name__}, not a dict")
    if row.get(messages_key) is not None:
        messages = _messages(row[messages_key])
    elif row.get(prompt_key) is not None:
        messages = [{"role": "user", "content": _text(row[prompt_key], f"'{prompt_key}'")}]
        if row.get(response_key) is not None:
            messages.append({"role": "assistant", "content": _text(row[response_key], f"'{response_key}'")})
    else:
        raise ValueError(f"row has neither '{messages_key}' nor '{prompt_key}' (keys: {sorted(row)})")
    if system_prompt is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return {"messages": messages, "difficulty": _difficulty(row.get(difficulty_key), difficulty_levels)}


class ParsedSource:
    """`source` with `parse_row` applied; a bad row raises MalformedRowError naming its index."""

    def __init__(self, source: RowSource, **parse_kwargs):
        self.source = source
        self.name = source.name
        self.parse_kwargs = parse_kwargs

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.source[index]
        try:
            return parse_row(row, **self.parse_kwargs)
        except MalformedRowError:
            raise
        except ValueError as e:
            src, local = self.source.locate(index) if isinstance(self.source, ConcatSource) else (self.source, index)
            raise MalformedRowError(src.name, local, str(e)) from e

    def difficulties(self) -> np.ndarray:
        """Difficulty of every row (NaN where missing or malformed), for curriculum ordering."""
        out = np.full(len(self), np.nan)
        for i in range(len(self)):
            try:
                d = self[i]["difficulty"]
            except MalformedRowError:
                continue
            if d is not None:
                out[i] = d
        return out
