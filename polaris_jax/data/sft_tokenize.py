"""One chat example -> token ids and a mask of the tokens the SFT loss trains on.

The trained span is the final assistant turn. The prompt is everything before it, rendered
with `add_generation_prompt=True` (exactly what the model sees at inference); the completion
is the rest of the conversation rendered with the same template. Prompt and completion are
tokenised separately and concatenated, so the prompt's tokens are the ones generation starts
from. Earlier assistant turns are context only (Qwen3's template drops their reasoning anyway).

Reasoning: the response may hold `<think>...</think>` inline or in `reasoning_content`.
Templates differ in what they do with it: Qwen3's keeps it for the final turn, while
DeepSeek-R1-Distill's cuts everything up to `</think>` and opens `<think>\\n` in the
generation prompt. `completion_mode` decides:
  * "template": the completion is the full render minus the prompt render; an example whose
    render does not extend the prompt render, or that loses its reasoning, is skipped;
  * "append": completion = the response itself (reasoning wrapped as `<think>\\n...\\n</think>\\n\\n`
    when given separately) + the eos token, minus any prefix the generation prompt already
    wrote (R1's `<think>\\n`);
  * "auto" (default): "template" when that keeps the reasoning and the answer, else "append".

Mask: 1 on completion tokens up to and including the last end-of-turn token (an id in
`tokenizer.eos_token_ids`); what a template writes after it (Qwen's trailing "\\n") stays in the
input but is not trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from polaris_jax.data.tokenizer import Tokenizer

SKIP_NO_ASSISTANT = "no_assistant_turn"
SKIP_TEMPLATE_MISMATCH = "template_mismatch"
SKIP_PROMPT_TOO_LONG = "prompt_too_long"
SKIP_MALFORMED = "malformed"
SKIP_REASONS = (SKIP_NO_ASSISTANT, SKIP_TEMPLATE_MISMATCH, SKIP_PROMPT_TOO_LONG, SKIP_MALFORMED)
COMPLETION_MODES = ("auto", "template", "append")


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
    max_length: int
    completion_mode: str = "auto"
    chat_template: str | None = None
    template_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.completion_mode not in COMPLETION_MODES:
            raise ValueError(f"completion_mode {self.completion_mode!r} is not one of {COMPLETION_MODES}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


def skipped(reason: str, detail: str = "") -> dict[str, Any]:
    return {"skip": reason, "detail": detail}


def _split_reasoning(message: Mapping[str, Any]) -> tuple[str | None, str]:
    """(reasoning or None, answer) from `reasoning_content` or an inline <think>...</think>."""
    content = message["content"]
    if message.get("reasoning_content") is not None:
        return message["reasoning_content"], content
    if "</think>" in content:
        head, answer = content.split("</think>", 1)
        return head.split("<think>")[-1], answer
    return None, content


def _appended_completion(prompt_text: str, message: Mapping[str, Any], eos_token: str) -> str:
    reasoning, answer = _split_reasoning(message)
    if reasoning is None:
        response = message["content"]
    else:
        response = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + answer.lstrip("\n")
    # The generation prompt may already open the reasoning block (R1-Distill ends with "<think>\n").
    opened = prompt_text.rstrip()
    if opened.endswith("<think>") and response.startswith("<think>"):
        already_written = prompt_text[len(opened) :]
        response = response[len("<think>") :]
        if response.startswith(already_written):
            response = response[len(already_written) :]
    return response + eos_token


def _template_keeps_response(completion: str, message: Mapping[str, Any]) -> bool:
    reasoning, answer = _split_reasoning(message)
    return answer.strip() in completion and (reasoning is None or reasoning.strip() in completion)


def tokenize_example(example: Mapping[str, Any], tokenizer: Tokenizer, options: TokenizeOptions) -> dict[str, Any]:
    """{"messages", ...} -> {"tokens": int32[L], "loss_mask": int8[L], "truncated": bool} or a skip."""
    messages = list(example["messages"])
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return skipped(SKIP_NO_ASSISTANT)
    conversation, assistant = messages[: last + 1], messages[last]
    kwargs = dict(options.template_kwargs)
    prompt_text = tokenizer.apply_chat_template(
        conversation[:-1], add_generation_prompt=True, chat_template=options.chat_template, **kwargs
    )
    completion = None
    if options.completion_mode in ("auto", "template"):
        full_text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=False, chat_template=options.chat_template, **kwargs
        )
        if full_text.startswith(prompt_text) and _template_keeps_response(full_text[len(prompt_text) :], assistant):
            completion = full_text[len(prompt_text) :]
        elif options.completion_mode == "template":
            return skipped(
                SKIP_TEMPLATE_MISMATCH,
                "the template's render of the conversation does not extend the prompt render with the full response",
            )
    if completion is None:
        eos = tokenizer.special_tokens_map.get("eos_token") or tokenizer.id_to_token(tokenizer.eos_token_id)
        completion = _appended_completion(prompt_text, assistant, eos)

    prompt_ids = tokenizer.encode(prompt_text)
    completion_ids = tokenizer.encode(completion)
    tokens = np.asarray(prompt_ids + completion_ids, np.int32)
    loss_mask = np.zeros(len(tokens), np.int8)
    ends = np.flatnonzero(np.isin(np.asarray(completion_ids, np.int64), tokenizer.eos_token_ids))
    trained = ends[-1] + 1 if len(ends) else len(completion_ids)
    loss_mask[len(prompt_ids) : len(prompt_ids) + trained] = 1
    truncated = len(tokens) > options.max_length
    if truncated:
        tokens, loss_mask = tokens[: options.max_length], loss_mask[: options.max_length]
    # Position 0 is never a target, so a lone trained token there teaches nothing.
    if not loss_mask[1:].any():
        return skipped(SKIP_PROMPT_TOO_LONG, f"prompt is {len(prompt_ids)} tokens, max_length {options.max_length}")
    return {"tokens": tokens, "loss_mask": loss_mask, "truncated": truncated}
