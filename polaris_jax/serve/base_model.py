"""The one base model a server holds: its names, weights, tokenizer directory, stop ids and limits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from polaris_jax.serve.tinker_proto import BadInput


@dataclasses.dataclass
class BaseModel:
    names: tuple[str, ...]  # the --model argument, then its basename: what clients may call it
    directory: str  # absolute: the tokenizer_id the tinker SDK loads offline
    config: object
    params: dict
    eos_token_ids: tuple[int, ...]
    max_seq_len: int

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def check_name(self, name, field: str = "base_model") -> str:
        if name not in self.names:
            raise BadInput(f"{field}: {name!r} is not served here (served: {list(self.names)})")
        return name


def eos_ids(path: Path, tokenizer) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an id or a list) if present, else the tokenizer's eos ids."""
    gen = path / "generation_config.json"
    eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        return tuple(tokenizer.eos_token_ids)
    return (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)
