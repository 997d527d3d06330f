"""OpenAI request validation (pydantic) and response shaping (the `openai` package's own response types).

The request models list the fields served; unknown fields are accepted and ignored, except those in
`UNSUPPORTED` set to a non-default value, which are refused (400, naming the field). Engine deltas
become choices through `serve.choices.ChoiceText` (decoded text, stop strings); this module shapes them
into the completions-format logprobs. The engine returns the chosen token's logprob only, so every
`top_logprobs` entry holds that one token.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pydantic
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat import chat_completion as chat
from openai.types.chat import chat_completion_chunk as chunk

from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.serve.choices import ChoiceText

UNSUPPORTED = {"echo", "suffix", "best_of", "logit_bias", "presence_penalty", "frequency_penalty", "tools"}
UNSUPPORTED_DEFAULTS = {"best_of": 1, "presence_penalty": 0, "frequency_penalty": 0}


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}} body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class _Sampling(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    model: str
    n: int = pydantic.Field(1, ge=1)
    max_tokens: int | None = pydantic.Field(None, ge=1)
    temperature: float = pydantic.Field(1.0, ge=0.0)
    top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = pydantic.Field(None, ge=0, lt=2**31)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def check_supported(self, max_slots: int) -> None:
        """Refuses the fields this server does not implement (set to a non-default value), and n > max_slots."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in (None, False, [], UNSUPPORTED_DEFAULTS.get(name)):
                raise ApiError(400, f"{name}: {value!r} is not supported by this server", name)
        if self.n > max_slots:
            raise ApiError(400, f"n: {self.n} exceeds the {max_slots} samples this server decodes at once", "n")

    @property
    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[list[int]] | list[str]
    logprobs: int | None = pydantic.Field(None, ge=0, le=20)

    @property
    def wants_logprobs(self) -> bool:  # logprobs=0 still asks for the chosen tokens' own
        return self.logprobs is not None


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = pydantic.Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = pydantic.Field(None, ge=0, le=20)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs


def validation_error(exc) -> ApiError:
    """A pydantic/FastAPI validation error -> 400 naming the field as the client wrote it."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) or "request"
    return ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", param)


def prompt_ids(req: CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """The completion request's prompts as token-id lists (a string is encoded without special tokens)."""
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: is empty", "prompt")
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def chat_prompt_ids(req: ChatRequest, tokenizer: Tokenizer) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template error is the client's messages
        raise ApiError(400, f"messages: the chat template could not render them: {e}", "messages") from None
    return tokenizer.encode(text)


def check_prompt(ids: list[int], max_tokens: int | None, *, vocab_size: int, max_seq_len: int, field: str) -> int:
    """Checks one prompt against the vocabulary and the context; returns max_tokens (default: the rest)."""
    if not ids:
        raise ApiError(400, f"{field}: is empty (no tokens)", field)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"{field}: token id {bad} is outside the vocabulary [0, {vocab_size})", field)
    if len(ids) >= max_seq_len:
        raise ApiError(400, f"{field}: {len(ids)} tokens leave no room in the context of {max_seq_len} tokens", field)
    if max_tokens is None:
        return max_seq_len - len(ids)
    if len(ids) + max_tokens > max_seq_len:
        raise ApiError(
            400,
            f"max_tokens: {max_tokens} new tokens + the prompt's {len(ids)} exceed the context of {max_seq_len}",
            "max_tokens",
        )
    return max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, choices: list[ChoiceText]) -> CompletionUsage:
    new = sum(len(c.tokens) for c in choices)
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=new, total_tokens=prompt_tokens + new)


def completion(rid: str, model: str, choices: list[ChoiceText], prompt_tokens: int, logprobs: bool) -> Completion:
    return Completion(
        id=rid,
        object="text_completion",
        created=int(time.time()),
        model=model,
        choices=[
            CompletionChoice(
                index=i,
                text=c.text,
                finish_reason=c.finish or "stop",
                logprobs=c.completion_logprobs() if logprobs else None,
            )
            for i, c in enumerate(choices)
        ],
        usage=usage(prompt_tokens, choices),
    )


def completion_chunk(rid: str, model: str, index: int, choice: ChoiceText, piece: tuple, logprobs: bool):
    """One streamed completions chunk of `choice.take()`'s piece (finish_reason None until the last)."""
    text, start, finish = piece
    lps = choice.completion_logprobs(start) if logprobs else None
    item = CompletionChoice.model_construct(index=index, text=text, finish_reason=finish, logprobs=lps)
    return Completion.model_construct(
        id=rid, object="text_completion", created=int(time.time()), model=model, choices=[item]
    )


def chat_completion(rid: str, model: str, choices: list[ChoiceText], prompt_tokens: int, top: int | None):
    return ChatCompletion(
        id=rid,
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[
            chat.Choice(
                index=i,
                message=ChatCompletionMessage(role="assistant", content=c.text),
                finish_reason=c.finish or "stop",
                logprobs=None if top is None else chat.ChoiceLogprobs(content=c.chat_logprobs(top)),
            )
            for i, c in enumerate(choices)
        ],
        usage=usage(prompt_tokens, choices),
    )


def chat_chunk(rid: str, model: str, index: int, choice: ChoiceText | None, piece: tuple | None, top: int | None):
    """One streamed chat chunk of `choice.take()`'s piece; `choice` None gives the opening chunk (the role)."""
    if choice is None:
        delta, finish, logprobs = chunk.ChoiceDelta(role="assistant", content=""), None, None
    else:
        text, start, finish = piece
        delta = chunk.ChoiceDelta(content=text)
        logprobs = None if top is None else chunk.ChoiceLogprobs(content=choice.chat_logprobs(top, start))
    return ChatCompletionChunk(
        id=rid,
        object="chat.completion.chunk",
        created=int(time.time()),
        model=model,
        choices=[chunk.Choice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)],
    )


def usage_chunk(cls, rid: str, model: str, prompt_tokens: int, choices: list[ChoiceText]):
    """The last streamed chunk when stream_options.include_usage: no choices, the usage."""
    kind = "chat.completion.chunk" if cls is ChatCompletionChunk else "text_completion"
    return cls.model_construct(
        id=rid, object=kind, created=int(time.time()), model=model, choices=[], usage=usage(prompt_tokens, choices)
    )
