"""Engine deltas as the choices a client sees, for the OpenAI routes and Tinker sampling alike: `ChoiceText`
accumulates one choice's tokens and logprobs with incremental detokenisation (special tokens skipped) and
ends it at the first stop string in the decoded text (the text is cut before it; the token completing it is
kept), and gives its logprobs in OpenAI's two formats; `drive` feeds a request's streams into its choices
and aborts a request whose choices all ended.
"""

from __future__ import annotations

from openai.types.chat import ChatCompletionTokenLogprob
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_choice import Logprobs

from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.serve.engine_thread import merge


class ChoiceText:
    """One choice's tokens, logprobs and decoded text, built from engine deltas."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # chars a stream holds back (a stop may start)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.offsets: list[int] = []
        self.text, self.sent, self.finish = "", 0, None
        self.tokens_sent, self.ended = 0, False
        self._prefix = self._read = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)

    def _detokenize(self, final: bool) -> str:
        """New text of the tokens so far (held back while the last token ends in a partial character)."""
        before = self._decode(self._prefix, self._read)
        now = self._decode(self._prefix)
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return now[len(before) :]

    def add(self, tokens: list[int], logprobs: list[float], engine_finish: str | None) -> None:
        for token, logprob in zip(tokens, logprobs):
            if self.finish is not None:
                return
            self.offsets.append(len(self.text))
            self.tokens.append(token)
            self.logprobs.append(logprob)
            start = max(0, len(self.text) - self.hold)
            self.text += self._detokenize(final=False)
            found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.text, self.finish = self.text[: min(found)], "stop"
        if engine_finish is not None and self.finish is None:
            self.text += self._detokenize(final=True)
            self.finish = "length" if engine_finish == "length" else "stop"

    def take(self) -> tuple[str, int, str | None] | None:
        """What a stream sends next, or None: (new text, index of the first token not yet sent, the finish
        reason on the choice's last chunk). While running, the text a stop string could start is held."""
        end = len(self.text) if self.finish else max(self.sent, len(self.text) - self.hold)
        text, self.sent = self.text[self.sent : end], end
        start, self.tokens_sent = self.tokens_sent, len(self.tokens)
        finish = None if self.ended else self.finish
        self.ended = self.finish is not None
        if not text and finish is None and start == len(self.tokens):
            return None
        return text, start, finish

    def token_strings(self) -> list[str]:
        return [self.tokenizer.decode([t]) for t in self.tokens]

    def completion_logprobs(self, start: int = 0) -> Logprobs:
        pieces = self.token_strings()[start:]
        return Logprobs(
            tokens=pieces,
            token_logprobs=self.logprobs[start:],
            top_logprobs=[{p: lp} for p, lp in zip(pieces, self.logprobs[start:])],
            text_offset=self.offsets[start:],
        )

    def chat_logprobs(self, top: int, start: int = 0) -> list[ChatCompletionTokenLogprob]:
        out = []
        for piece, lp in zip(self.token_strings()[start:], self.logprobs[start:]):
            raw = list(piece.encode("utf-8"))
            alts = [TopLogprob(token=piece, bytes=raw, logprob=lp)] if top else []
            out.append(ChatCompletionTokenLogprob(token=piece, bytes=raw, logprob=lp, top_logprobs=alts))
        return out


async def drive(streams, choices: list[ChoiceText], n: int, is_disconnected=None):
    """Feeds the engine's deltas into `choices` (request i's sample j is choice i·n + j); yields the index
    of each choice that changed. A request whose choices all ended on a stop string is aborted."""
    async for i, delta in merge(streams, is_disconnected):
        choice = choices[i * n + delta.sample]
        choice.add(delta.tokens, delta.logprobs, delta.finish_reason)
        yield i * n + delta.sample
        if all(c.finish for c in choices[i * n : (i + 1) * n]):
            streams[i].close()
