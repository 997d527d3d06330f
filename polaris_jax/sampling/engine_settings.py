"""The engine's fixed sizes (`EngineSettings`) and the config section that picks the sampler (`engine_section`).

Every size here fixes a compiled shape of `engine_steps`, so it is set once per engine; the config keys
(`rollout.sampler` in GRPO configs, `sampler` in the eval config) choose between the static `generate`
and the paged engine and size the latter.
"""

from __future__ import annotations

import dataclasses

from polaris_jax.models.config import PAGED_ATTENTION_IMPLS
from polaris_jax.sampling.requests import RequestError


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Fixed per engine (they fix every compiled shape).

    max_slots: samples decoding at once (the largest slot bucket).
    num_pages, page_size: the KV pool (page 0 is the reserved null page).
    max_seq_len: prompt + max_new_tokens of any request; the page-table width is max_seq_len / page_size.
    prefill_chunk: prompt tokens prefilled per step (one device call).
    decode_block: tokens decoded per sample per step (one device call), at most page_size.
    max_queue: requests waiting for admission before `submit` raises QueueFull.
    max_eos_ids: EOS ids a request may give (a fixed shape of the decode call).
    slot_buckets: decode batch sizes (default: max_slots and its halves, down to max_slots / 8).
    record_experts: MoE only: record each fed token's experts in `Completion.routed_experts` (router replay).
    attention_kernel: decode attention over the pages: auto (the platform's Pallas kernel where it fits; on one
      CPU device the C++ kernel, models/cpu_paged.cc) | xla (the plain-JAX reference) | gpu | tpu | cpu (that
      kernel; refused where it cannot run).
    adapter_slots: multi-LoRA: the params hold this many adapters stacked (`models.lora.stack_adapters`)
      and each request decodes with its `Request.adapter`, all in the same batch; 0: no stack.
    """

    max_slots: int = 64
    num_pages: int = 1024
    page_size: int = 16
    max_seq_len: int = 4096
    prefill_chunk: int = 512
    decode_block: int = 8
    max_queue: int = 1024
    slot_buckets: tuple[int, ...] = ()
    max_eos_ids: int = 8
    record_experts: bool = False
    attention_kernel: str = "auto"
    adapter_slots: int = 0

    def buckets(self, shards: int = 1) -> tuple[int, ...]:
        sizes = self.slot_buckets or tuple(self.max_slots // d for d in (8, 4, 2, 1))
        sizes = sorted({-(-max(s, 1) // shards) * shards for s in sizes})
        return tuple(sizes)

    def check(self, config, shards: int) -> None:
        for name in (
            "max_slots",
            "num_pages",
            "page_size",
            "max_seq_len",
            "prefill_chunk",
            "decode_block",
            "max_queue",
            "max_eos_ids",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineSettings.{name}={value!r} must be a positive integer")
        if isinstance(self.adapter_slots, bool) or not isinstance(self.adapter_slots, int) or self.adapter_slots < 0:
            raise ValueError(f"EngineSettings.adapter_slots={self.adapter_slots!r} must be an integer >= 0")
        if self.attention_kernel not in PAGED_ATTENTION_IMPLS:
            raise ValueError(f"attention_kernel={self.attention_kernel!r} is not one of {PAGED_ATTENTION_IMPLS}")
        if self.record_experts and not config.is_moe:
            raise ValueError("record_experts=True records MoE routing, but the model has no experts")
        if self.decode_block > self.page_size:
            raise ValueError(f"decode_block={self.decode_block} must be <= page_size={self.page_size}")
        if max(self.buckets(shards)) < self.max_slots:
            raise ValueError(f"slot_buckets={self.slot_buckets} must hold max_slots={self.max_slots}")
        if self.prefill_chunk % shards:
            raise ValueError(f"prefill_chunk={self.prefill_chunk} must be a multiple of the {shards} batch shards")
        limit = config.max_position_embeddings
        if self.max_seq_len > limit:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds the model's max_position_embeddings={limit}")
        per_seq = -(-self.max_seq_len // self.page_size) + 1
        if self.num_pages - 1 < per_seq:
            raise ValueError(
                f"num_pages={self.num_pages} cannot hold one sequence of max_seq_len={self.max_seq_len} "
                f"({per_seq} pages of {self.page_size} tokens plus the null page)"
            )

    def check_request(self, request) -> None:
        """What a valid request (`Request.check`) must also meet on this engine; RequestError names it."""
        name = f"request {request.id!r}"
        if len(request.eos_token_ids) > self.max_eos_ids:
            raise RequestError(
                f"{name}: {len(request.eos_token_ids)} eos_token_ids, more than max_eos_ids={self.max_eos_ids}"
            )
        if request.n > self.max_slots:
            raise RequestError(f"{name}: n={request.n} exceeds max_slots={self.max_slots}")
        if request.adapter and not 0 <= request.adapter < self.adapter_slots:
            raise RequestError(
                f"{name}: adapter={request.adapter!r} is not one of the engine's {self.adapter_slots} adapter slots"
            )


BACKENDS = ("static", "engine")


def engine_section():
    """The paged engine's fixed sizes as config keys (num_pages 0: enough pages for max_slots full-length
    samples). Beside it, a `backend` key chooses the sampler: "static" (`sampling.generate`, one static batch
    with row compaction) or "engine" (`sampling.engine.Engine`, continuous batching over a paged KV cache)."""
    import ml_collections  # here, so the engine imports on a bare JAX install (benchmarks.device_suite)

    return ml_collections.ConfigDict(
        dict(max_slots=64, page_size=16, num_pages=0, prefill_chunk=512, decode_block=8, attention_kernel="auto")
    )


def check_sampler_config(backend: str, engine, where: str = "") -> None:
    """Refuses a bad `backend` or engine section, naming the key (`where` prefixes the key names)."""
    if backend not in BACKENDS:
        raise ValueError(f"{where}backend={backend!r} must be one of {BACKENDS}")
    for key in ("max_slots", "page_size", "prefill_chunk", "decode_block"):
        if int(engine[key]) < 1:
            raise ValueError(f"{where}engine.{key}={engine[key]!r} must be >= 1")
    if int(engine.num_pages) < 0:
        raise ValueError(f"{where}engine.num_pages={engine.num_pages!r} must be >= 0 (0: sized for max_slots)")
    if int(engine.decode_block) > int(engine.page_size):
        raise ValueError(f"{where}engine.decode_block={engine.decode_block} must be <= page_size={engine.page_size}")
    kernel = engine.get("attention_kernel", "auto")
    if kernel not in PAGED_ATTENTION_IMPLS:
        raise ValueError(f"{where}engine.attention_kernel={kernel!r} must be one of {PAGED_ATTENTION_IMPLS}")


def engine_settings_from(engine, max_seq_len: int, record_experts: bool = False) -> EngineSettings:
    """The EngineSettings an `engine_section()` asks for, for samples of up to `max_seq_len` tokens."""
    engine = dict(engine)
    page = int(engine["page_size"])
    pages_per_seq = -(-max_seq_len // page)
    return EngineSettings(
        max_slots=int(engine["max_slots"]),
        page_size=page,
        num_pages=int(engine["num_pages"]) or int(engine["max_slots"]) * (pages_per_seq + 1) + 1,
        max_seq_len=max_seq_len,
        prefill_chunk=int(engine["prefill_chunk"]),
        decode_block=int(engine["decode_block"]),
        max_queue=1 << 30,
        record_experts=record_experts,
        attention_kernel=str(engine.get("attention_kernel", "auto")),
    )
