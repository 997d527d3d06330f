"""What the engine is asked (`Request`) and what it answers (`Delta` while running, `Completion` at the end).

A request is validated whole when it is submitted (`Request.check`), before anything is queued or
compiled, and every error names the request, so one bad request never disturbs the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from polaris_jax.sampling.decode_loop import FINISH_REASONS, RUNNING
from polaris_jax.sampling.sampler import SampleOutput
from polaris_jax.sampling.strategies import SamplingSettings


class RequestError(ValueError):
    """A request the engine refuses; the message names the request and the problem."""


class QueueFull(RuntimeError):
    """Back-pressure: the engine's waiting queue is at `max_queue`; submit again after some `step()`s."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and how to continue it, n times.

    Sample j of a request draws its t-th token from fold_in(fold_in(fold_in(key(seed), sample_offset + j)),
    t): a function of the request alone, never of the batch it shares. `generate(prompts, n, seed)` gives
    prompt i's sample j the same key as a request with that seed and sample_offset = i·n.

    prefix: tokens already generated (n must be 1): the request resumes a partial rollout, continuing
      its token count (and so its random keys) from len(prefix); `Completion.resume()` builds one.
    adapter: multi-LoRA: the engine's adapter slot to decode with (`EngineSettings.adapter_slots`).
    logprobs: False lets a decode call whose rows are all greedy and want none skip them (on CPU, the fused
      kernel's argmax alone: a serving client that asked for no logprobs); this request's may then be NaN.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    eos_token_ids: Sequence[int] = ()
    stop_sequences: Sequence[Sequence[int]] = ()
    seed: int = 0
    sample_offset: int = 0
    id: object = None
    prefix: Sequence[int] = ()
    adapter: int = 0
    logprobs: bool = True

    def settings(self) -> SamplingSettings:
        return SamplingSettings.create(self.temperature, self.top_p, self.top_k, self.min_p)

    def check(self, vocab_size: int, max_seq_len: int) -> None:
        """Raises RequestError naming this request on any bad field."""
        name = f"request {self.id!r}"

        def ids(field: str, values, allow_empty: bool):
            values = list(values)
            if not values and not allow_empty:
                raise RequestError(f"{name}: {field} is empty")
            for token in values:
                if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
                    raise RequestError(f"{name}: {field} holds {token!r}, not an integer token id")
                if not 0 <= token < vocab_size:
                    raise RequestError(
                        f"{name}: {field} holds token id {token} outside the vocabulary [0, {vocab_size})"
                    )

        ids("prompt", self.prompt, allow_empty=False)
        ids("prefix", self.prefix, allow_empty=True)
        ids("eos_token_ids", self.eos_token_ids, allow_empty=True)
        for i, seq in enumerate(self.stop_sequences):
            ids(f"stop_sequences[{i}]", seq, allow_empty=False)
        for field, low in (("max_new_tokens", 1), ("n", 1), ("seed", 0), ("sample_offset", 0), ("adapter", 0)):
            value = getattr(self, field)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
                raise RequestError(f"{name}: {field}={value!r} must be an integer >= {low}")
        if not isinstance(self.logprobs, (bool, np.bool_)):
            raise RequestError(f"{name}: logprobs={self.logprobs!r} must be a bool")
        if self.seed >= 2**31 or self.sample_offset >= 2**31:
            raise RequestError(f"{name}: seed and sample_offset must be < 2**31")
        if self.prefix and self.n != 1:
            raise RequestError(f"{name}: a prefix (a resumed partial rollout) needs n=1, got n={self.n}")
        if len(self.prefix) >= self.max_new_tokens:
            raise RequestError(f"{name}: its prefix of {len(self.prefix)} tokens leaves no new token of max_new_tokens")
        total = len(self.prompt) + self.max_new_tokens
        if total > max_seq_len:
            raise RequestError(
                f"{name}: prompt ({len(self.prompt)} tokens) + max_new_tokens ({self.max_new_tokens}) = {total} "
                f"exceeds the engine's max_seq_len {max_seq_len}"
            )
        try:
            self.settings()
        except ValueError as e:
            raise RequestError(f"{name}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Delta:
    """New tokens of one sample since the last `Engine.step()` (streaming). finish_reason is set on the
    sample's last delta ("eos", "stop", "length", or "abort")."""

    request_id: object
    sample: int
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    """One sample's output: tokens (the EOS id or stop sequence included), their logprobs (generate's
    convention), the weight version that produced each token, and why it ended (None while unfinished,
    e.g. a partial rollout)."""

    request: Request
    sample: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    # Router replay (EngineSettings.record_experts): int16 [positions, MoE layers, k], the experts each context
    # token (prompt, then tokens but the last) was routed to when fed; -1 where none was recorded.
    routed_experts: np.ndarray | None = None

    def record_experts(self, start: int, experts_nlk: np.ndarray) -> None:
        """Writes the experts of context positions start.. into `routed_experts` (int16, -1 = none)."""
        end = start + len(experts_nlk)
        held = self.routed_experts
        if held is None or len(held) < end:
            grown = np.full((max(end, 2 * (0 if held is None else len(held))), *experts_nlk.shape[1:]), -1, np.int16)
            if held is not None:
                grown[: len(held)] = held
            self.routed_experts = held = grown
        held[start:end] = experts_nlk

    def resume(self, **changes) -> Request:
        """A request that continues this partial sample from its tokens (same keys, same settings)."""
        fields = dict(n=1, sample_offset=self.request.sample_offset + self.sample, prefix=tuple(self.tokens))
        return dataclasses.replace(self.request, **{**fields, **changes})


FINISH_CODES = {name: code for code, name in FINISH_REASONS.items()}


def to_sample_output(completions: Sequence[Sequence[Completion]], max_new_tokens: int) -> SampleOutput:
    """`generate`'s padded arrays from the engine's completions (request i's sample j is row i·n + j)."""
    rows = [c for per_request in completions for c in per_request]
    out = SampleOutput(
        tokens_br=np.zeros((len(rows), max_new_tokens), np.int32),
        logprobs_br=np.zeros((len(rows), max_new_tokens), np.float32),
        lengths_b=np.zeros(len(rows), np.int32),
        finish_b=np.full(len(rows), RUNNING, np.int32),
    )
    for b, c in enumerate(rows):
        if len(c.tokens) > max_new_tokens:
            raise ValueError(f"request {c.request.id!r} sample {c.sample}: {len(c.tokens)} tokens > {max_new_tokens}")
        out.tokens_br[b, : len(c.tokens)] = c.tokens
        out.logprobs_br[b, : len(c.tokens)] = c.logprobs
        out.lengths_b[b] = len(c.tokens)
        out.finish_b[b] = FINISH_CODES.get(c.finish_reason, RUNNING)
    if rows and rows[0].routed_experts is not None:
        out = dataclasses.replace(out, routed_experts=tuple(c.routed_experts for c in rows))
    return out
