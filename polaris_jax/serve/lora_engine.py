"""Multi-LoRA sampling: one engine over the base weights plus a stack of `max_loras` adapter slots, so the
requests of every adapter in use decode in the same batches (S-LoRA / vLLM's multi-LoRA serving).

    async with lora.lease(weights) as slot:        # loads the adapter into a free slot if it has none
        streams = await lora.thread.submit_all([dataclasses.replace(request, adapter=slot)])

A slot is held while a request on it runs; an adapter not in a slot takes the least recently used idle
one (waiting while every slot is busy). The stack's rank and targets are the largest and the union of
the adapters it holds: a new adapter that needs more rebuilds the stack (one recompile). Loading writes
the stack into the engine between two steps, on the engine's own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import jax

from polaris_jax.models.lora import can_stack, stack_adapters
from polaris_jax.sampling.engine import Engine
from polaris_jax.serve.engine_thread import EngineThread
from polaris_jax.train import adapters

# One program per slot layout: eagerly, each leaf's pad, scale and stack dispatched (and compiled) on its own.
_stack = jax.jit(stack_adapters, static_argnames=("config", "rank", "targets"))


def supports(config, spec: adapters.AdapterSpec) -> bool:
    """Whether an adapter can share the stack (MoE expert adapters are sampled from a merged copy)."""
    return can_stack(config, spec.targets)


class LoraEngine:
    def __init__(self, base, settings, slots: int, load_adapter):
        """base: the BaseModel; settings: the base engine's EngineSettings; load_adapter(weights) -> the
        adapter's leaves (blocking: it may read a checkpoint)."""
        self.base, self.slots, self._load = base, slots, load_adapter
        self.settings = dataclasses.replace(settings, adapter_slots=slots)
        self.thread: EngineThread | None = None
        self.keys: list[str | None] = [None] * slots  # the Weights key each slot holds
        self._held: list[tuple | None] = [None] * slots  # (scale, leaves) per slot
        self._users = [0] * slots
        self._last_used = [0] * slots
        self._clock = 0
        self.rank, self.targets = 1, ()
        self._lock = asyncio.Lock()
        self._freed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lease(self, weights):
        slot = await self._acquire(weights)
        try:
            yield slot
        finally:
            self._users[slot] -= 1
            self._freed.set()

    def queue_full(self) -> bool:
        engine = None if self.thread is None else self.thread.engine
        return engine is not None and engine.queue_length >= engine.settings.max_queue

    def forget(self, key: str) -> None:
        """Frees the slot of weights no longer served (e.g. an old live snapshot) once it is idle."""
        for slot, held in enumerate(self.keys):
            if held == key and not self._users[slot]:
                self.keys[slot], self._held[slot] = None, None

    def close(self) -> None:
        if self.thread is not None:
            self.thread.close()

    async def _acquire(self, weights) -> int:
        async with self._lock:
            while True:
                slot = self._pick(weights.key)
                if slot is not None:
                    break
                self._freed.clear()
                await self._freed.wait()  # every slot runs requests of other adapters
            self._users[slot] += 1
            self._clock += 1
            self._last_used[slot] = self._clock
            if self.keys[slot] != weights.key:
                try:
                    await asyncio.to_thread(self._fill, slot, weights)
                except BaseException:
                    self._users[slot] -= 1
                    raise
            return slot

    def _pick(self, key: str) -> int | None:
        if key in self.keys:
            return self.keys.index(key)
        idle = [s for s in range(self.slots) if not self._users[s]]
        return min(idle, key=lambda s: (self.keys[s] is not None, self._last_used[s])) if idle else None

    def _fill(self, slot: int, weights) -> None:
        """Puts the adapter in `slot` and the rebuilt stack into the engine (made on first use); on an error
        nothing changes."""
        spec = weights.spec
        held = list(self._held)
        held[slot] = (spec.alpha / spec.rank, self._load(weights))
        rank, targets = max(self.rank, spec.rank), tuple(dict.fromkeys(self.targets + spec.targets))
        stack = _stack(self.base.config, held, rank=rank, targets=targets)
        params = adapters.with_adapter(self.base.params, stack)
        if self.thread is None:
            self.thread = EngineThread(Engine(self.base.config, params, self.settings), warmup=False)
            self.thread.start()
            self.thread.ready.wait()
        else:
            self.thread.call(lambda engine: engine.update_params(params)).result()
        self._held, self.rank, self.targets = held, rank, targets
        self.keys[slot] = weights.key
