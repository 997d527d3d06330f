"""Tinker sampling clients: samplers over the base model, a saved adapter or a live snapshot; `asample`.

A sampler's weights are the base model's or an adapter. Sampling runs on the continuous-batching
engine: the base model's engine (the one the OpenAI routes use) or, for adapters, one multi-LoRA
engine whose `max_loras` adapter slots decode in the same batches (`serve/lora_engine.py`). MoE expert
adapters, which the stack does not cover, get an engine over the base weights with the adapter merged
in, made on first use and kept for up to `max_loras` adapters (the least recently used idle one is
closed beyond that). `lease(weights)` gives the engine and slot to submit to. Prompt logprobs (and
their top-k) come from one forward pass over the prompt with the adapter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import uuid
from typing import Any, NamedTuple

import numpy as np

from polaris_jax.models.lora import merge_lora
from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.requests import Request, RequestError
from polaris_jax.serve import tinker_checkpoints as ckpt
from polaris_jax.serve.base_model import BaseModel
from polaris_jax.serve.choices import ChoiceText, drive
from polaris_jax.serve.engine_thread import EngineThread
from polaris_jax.serve.futures import PROTO, Futures
from polaris_jax.serve.lora_engine import LoraEngine, supports
from polaris_jax.serve.store import SamplerRow, Store
from polaris_jax.serve.tinker_proto import BadInput, sample_response
from polaris_jax.train import adapters

MAX_TOPK = 64


@dataclasses.dataclass(eq=False)
class Weights:
    key: str  # "base", a tinker:// sampler path, or "live:<sampler id>"
    spec: adapters.AdapterSpec | None = None
    adapter: dict | None = None


class Asample(NamedTuple):
    """A checked asample request: the weights to sample, the engine request, the top-k prompt logprobs
    asked for (-1: none), the stop strings matched on the decoded text, and the tokenizer that decodes it."""

    weights: Weights
    request: Request
    top: int
    stop_texts: list[str]
    tokenizer: Any


class Sampling:
    def __init__(self, base: BaseModel, store: Store, futures: Futures, base_engine: EngineThread, max_loras: int):
        self.base, self.store, self.futures = base, store, futures
        self.base_engine, self.max_loras = base_engine, max_loras
        self.samplers: dict[str, Weights] = {}
        self._by_path: dict[str, Weights] = {}
        self._live: collections.deque[str] = collections.deque()
        self.engines: collections.OrderedDict[str, EngineThread] = collections.OrderedDict()  # merged ones
        self.lora = LoraEngine(base, base_engine.engine.settings, max_loras, self._adapter)
        self._tokenizer = None

    @property
    def adapter_engines(self) -> list[EngineThread]:
        return list(self.engines.values()) + ([self.lora.thread] if self.lora.thread is not None else [])

    # ----- samplers -----

    def create(self, session_id: str, seq_id: int, base_model=None, model_path=None) -> str:
        sampler_id = f"{session_id}:sample:{seq_id}"
        if model_path:
            weights = self.path_weights(model_path)
            base_model = base_model or self.base.name
        else:
            weights = Weights("base")
        self.base.check_name(base_model)
        self.samplers[sampler_id] = weights
        self.store.put(SamplerRow(id=sampler_id, session_id=session_id, base_model=base_model, model_path=model_path))
        return sampler_id

    def _checkpoint(self, path):
        ckpt.parse_path(path, "model_path")
        row = self.store.get(ckpt.CheckpointRow, path)
        if row is None:
            raise BadInput(f"model_path: no checkpoint {path!r}")
        return row

    def add_live(self, session_id: str, spec, adapter) -> str:
        """A sampler over an in-memory adapter snapshot. The newest `4 * max_loras` are kept (an RL loop makes
        one per step); an older one answers 400 and its engine is closed."""
        sampler_id = f"{session_id}:live:{uuid.uuid4().hex[:12]}"
        self.samplers[sampler_id] = Weights(f"live:{sampler_id}", spec, adapter)
        self._live.append(sampler_id)
        while len(self._live) > 4 * self.max_loras:
            old = self.samplers.pop(self._live.popleft(), None)
            thread = self.engines.pop(old.key, None) if old is not None else None
            if thread is not None:
                thread.close()  # requests still on it end with EngineStopped
            if old is not None:
                self.lora.forget(old.key)
        self.store.put(SamplerRow(id=sampler_id, session_id=session_id, base_model=self.base.name))
        return sampler_id

    def sampler(self, sampler_id) -> Weights:
        weights = self.samplers.get(sampler_id)
        if weights is None:
            row = self.store.get(SamplerRow, sampler_id)  # made before a restart: still servable if saved
            if row is None or (row.model_path is None and ":live:" in sampler_id):
                raise BadInput(f"sampling_session_id: {sampler_id!r} is not a sampler of this server")
            weights = self.path_weights(row.model_path) if row.model_path else Weights("base")
            self.samplers[sampler_id] = weights
        return weights

    def path_weights(self, path: str) -> Weights:
        """The weights of a saved checkpoint path (one `Weights` per path, so its engine is reused)."""
        weights = self._by_path.get(path)
        if weights is None:
            weights = self._by_path[path] = Weights(path, ckpt.spec_of(self._checkpoint(path)))
        return weights

    def _adapter(self, weights: Weights) -> dict:
        if weights.adapter is None:
            weights.adapter, _ = ckpt.load(self.base.config, self._checkpoint(weights.key), with_optimizer=False)
        return weights.adapter

    @contextlib.asynccontextmanager
    async def lease(self, weights: Weights):
        """(engine thread, adapter slot) to submit these weights' requests to, held until the block ends."""
        if weights.key == "base":
            yield self.base_engine, 0
        elif supports(self.base.config, weights.spec):
            async with self.lora.lease(weights) as slot:
                yield self.lora.thread, slot
        else:
            yield await asyncio.to_thread(self._merged_engine, weights), 0

    def _merged_engine(self, weights: Weights) -> EngineThread:
        """An engine over the base weights with this adapter merged in (made, and warm, on first use)."""
        thread = self.engines.get(weights.key)
        if thread is None:
            config = weights.spec.model_config(self.base.config)
            _, merged = merge_lora(config, adapters.with_adapter(self.base.params, self._adapter(weights)))
            thread = EngineThread(Engine(self.base.config, merged, self.base_engine.engine.settings), warmup=False)
            thread.start()
            thread.ready.wait()
            self.engines[weights.key] = thread
            idle = [k for k, t in self.engines.items() if not t.engine.busy and k != weights.key]
            while len(self.engines) > self.max_loras and idle:
                self.engines.pop(idle.pop(0)).close()
        self.engines.move_to_end(weights.key)
        return thread

    def queue_full(self, weights: Weights) -> bool:
        if weights.key != "base" and supports(self.base.config, weights.spec):
            return self.lora.queue_full()
        thread = self.base_engine if weights.key == "base" else self.engines.get(weights.key)
        if thread is None:
            return False
        return thread.engine.queue_length >= thread.engine.settings.max_queue

    # ----- asample -----

    def request(self, body: dict, tokenizer) -> Asample:
        """Checks an asample body into an `Asample`."""
        weights = self.sampler(body.get("sampling_session_id"))
        chunks = (body.get("prompt") or {}).get("chunks") or []
        tokens = []
        for i, chunk in enumerate(chunks):
            if chunk.get("type", "encoded_text") != "encoded_text" or not isinstance(chunk.get("tokens"), list):
                raise BadInput(f"prompt.chunks[{i}]: only encoded_text chunks with a tokens list are served")
            tokens += chunk["tokens"]
        params = body.get("sampling_params") or {}
        n = body.get("num_samples", 1)
        max_slots = self.base_engine.engine.settings.max_slots
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_slots:
            raise BadInput(f"num_samples: {n!r} must be an integer in [1, {max_slots}]")
        for field in ("topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(field):
                raise BadInput(f"{field}: not served by this server (send 0)")
        top = body.get("topk_prompt_logprobs") or 0
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOPK:
            raise BadInput(f"topk_prompt_logprobs: {top!r} must be an integer in [0, {MAX_TOPK}]")
        max_tokens = params.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.base.max_seq_len - len(tokens)
        eos, stops, stop_texts = self._stops(params.get("stop"), tokenizer)
        seed, top_k = params.get("seed"), params.get("top_k", -1)
        request = Request(
            prompt=tokens,
            max_new_tokens=max_tokens,
            temperature=params.get("temperature", 1.0),
            top_p=params.get("top_p", 1.0),
            top_k=0 if top_k == -1 else top_k,  # tinker's -1: no top-k
            n=n,
            eos_token_ids=eos,
            stop_sequences=stops,
            seed=random.randrange(2**31) if seed is None else seed,
            id=f"asample-{uuid.uuid4().hex}",
        )
        try:
            request.check(self.base.vocab_size, self.base.max_seq_len)
        except RequestError as e:
            message = str(e).split(": ", 1)[-1].replace("max_new_tokens", "sampling_params.max_tokens")
            raise BadInput(message) from None
        wants_prompt = bool(body.get("prompt_logprobs")) or top > 0
        return Asample(weights, request, top if wants_prompt else -1, stop_texts, tokenizer)

    def _stops(self, stop, tokenizer):
        """(eos ids, stop token sequences, stop strings): stop=None keeps the model's EOS ids; a given list
        replaces them (ids stop at that token; a string stops where the decoded text first contains it,
        whatever tokens spell it, and the engine also stops on its own tokenization); [] stops only at
        max_tokens."""
        if stop is None:
            return self.base.eos_token_ids, (), []
        stop = [stop] if isinstance(stop, (str, int)) else stop
        if not isinstance(stop, list) or not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in stop):
            raise BadInput(f"sampling_params.stop: {stop!r} is not a string, a list of strings or a list of token ids")
        ids = tuple(s for s in stop if isinstance(s, int))
        texts = [s for s in stop if isinstance(s, str) and s]
        return ids, tuple(tuple(tokenizer.encode(s)) for s in texts), texts

    async def sample(self, call: Asample, request_id: str) -> None:
        """Runs a checked request and finishes its future with a SampleResponse. A sample ends at the token
        that completes a stop string in its decoded text (that token included, as vLLM returns them)."""
        weights, request, top = call.weights, call.request, call.top
        try:
            choices = [ChoiceText(call.tokenizer, call.stop_texts) for _ in range(request.n)]
            async with self.lease(weights) as (engine, slot):
                streams = await engine.submit_all([dataclasses.replace(request, adapter=slot)])
                async for _ in drive(streams, choices, request.n):
                    pass
            seqs = [[c.tokens, c.logprobs, c.finish or "length"] for c in choices]
            prompt_lp, topk = None, None
            if top >= 0:
                prompt_lp, topk = await asyncio.to_thread(self._prompt_logprobs, weights, list(request.prompt), top)
            self.futures.finish(request_id, "done", PROTO, sample_response(seqs, prompt_lp, topk))
        except Exception as e:  # noqa: BLE001 - the client learns of it through the future
            self.futures.fail(request_id, f"{type(e).__name__}: {e}", "server")

    def _prompt_logprobs(self, weights: Weights, prompt: list[int], top: int):
        t = len(prompt)
        padded = adapters.pad_batch([{"tokens": prompt, "target_tokens": prompt}], (), {})
        config = self.base.config if weights.spec is None else weights.spec.model_config(self.base.config)
        adapter = {} if weights.spec is None else self._adapter(weights)
        lp_bt, ids_btk, top_btk = adapters.prompt_logprobs(
            config, self.base.params, adapter, padded["tokens_bt"], padded["mask_bt"], k=top
        )
        prompt_lp = np.concatenate([[np.nan], np.asarray(lp_bt)[0, : t - 1]]).astype(np.float32)
        topk = (np.asarray(ids_btk)[0, :t], np.asarray(top_btk)[0, :t]) if top else None
        return prompt_lp, topk

    def close(self) -> None:
        for thread in self.engines.values():
            thread.close()
        self.lora.close()
