"""The SFT input pipeline on grain: sources -> order -> tokenise -> pack or bucket -> [B, T] batches.

    it = make_sft_iterator(config.data, tokenizer)
    batch = next(it)          # tokens_bt, positions_bt, segment_ids_bt, targets_bt, loss_mask_bt
    state = it.get_state()    # JSON-able; grain.checkpoint.CheckpointSave(it) stores it with orbax
    it.set_state(state)       # the following batches are exactly those a straight run sees
    iterator_stats(it)        # cumulative counts: examples, truncated, skipped_<reason>, ...

Order (per epoch, before packing): "shuffle" (a seeded permutation, different every epoch),
"curriculum" (easy -> hard by the difficulty field within every epoch, as Fathom-R1 trains;
ties in a seeded random order), or "sequential". Hosts read disjoint slices
`[shard_index::shard_count]` of that order.

Rows: "pack" fills each row of `seq_len` tokens with whole examples in order (an example that
does not fit starts the next row) - see `packing.py` for the arrays. "bucket" puts one example
per row, padded to the smallest of `buckets` that holds it; a batch is emitted when a bucket has
`batch_size` examples, so batch shapes come from `len(buckets)` choices. Examples longer than
`seq_len` (or the largest bucket) are truncated and counted. The last batch of a finite run is
filled with empty rows (segment id 0, loss mask 0).

The iterator state is (next example index, examples held in bucket buffers, the counters), so
resuming re-reads exactly the examples a straight run would read next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from polaris_jax.data import packing
from polaris_jax.data import sources as sources_lib
from polaris_jax.data.chat_template import BUILTIN_TEMPLATES, builtin_template
from polaris_jax.data.sft_tokenize import SKIP_MALFORMED, SKIP_REASONS, TokenizeOptions, skipped, tokenize_example
from polaris_jax.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ORDERS = ("shuffle", "curriculum", "sequential")
MODES = ("pack", "bucket")
STAT_KEYS = ("examples", "truncated", "tokens", "loss_tokens") + tuple(f"skipped_{r}" for r in SKIP_REASONS)
_MAX_LOGGED_SKIPS = 10


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    """The data section of an SFT config.

    sources: .jsonl/.json, .parquet, "tfds:NAME" or prepared tfds dirs (read in order, as one).
    batch_size, seq_len: every batch is [batch_size, seq_len] (bucket mode: [batch_size, bucket]).
    num_epochs: None repeats forever. template_kwargs: e.g. {"enable_thinking": True}.
    chat_template: None = the tokenizer's; a built-in name (qwen3, r1_distill_qwen) or template text.
    completion_mode: see sft_tokenize.py. on_malformed: "raise" or "skip" (and count) bad rows.
    prefetch: >0 runs the pipeline in a background thread with that many batches buffered.
    """

    sources: tuple[str, ...]
    batch_size: int
    seq_len: int
    mode: str = "pack"
    buckets: tuple[int, ...] = ()
    order: str = "shuffle"
    seed: int = 0
    num_epochs: int | None = 1
    split: str = "train"
    tfds_data_dir: str | None = None
    messages_key: str = "messages"
    prompt_key: str = "prompt"
    response_key: str = "response"
    difficulty_key: str = "difficulty"
    difficulty_levels: tuple[str, ...] = ()
    system_prompt: str | None = None
    chat_template: str | None = None
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    completion_mode: str = "auto"
    on_malformed: str = "raise"
    shard_index: int = 0
    shard_count: int = 1
    prefetch: int = 0

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ValueError(f"data config: {message}")

        check(len(self.sources) > 0, "sources is empty")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        check(self.mode in MODES, f"mode {self.mode!r} is not one of {MODES}")
        check(self.order in ORDERS, f"order {self.order!r} is not one of {ORDERS}")
        check(self.on_malformed in ("raise", "skip"), f"on_malformed {self.on_malformed!r} is not 'raise' or 'skip'")
        check(
            self.num_epochs is None or self.num_epochs >= 1, f"num_epochs must be >= 1 or None, got {self.num_epochs}"
        )
        check(
            0 <= self.shard_index < self.shard_count, f"shard_index {self.shard_index} not in [0, {self.shard_count})"
        )
        check(self.prefetch >= 0, f"prefetch must be >= 0, got {self.prefetch}")
        check(list(self.buckets) == sorted(set(self.buckets)), f"buckets must be increasing, got {self.buckets}")
        check(
            not self.buckets or self.buckets[-1] <= self.seq_len,
            f"largest bucket {self.buckets[-1] if self.buckets else 0} exceeds seq_len {self.seq_len}",
        )

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        if self.buckets:
            return tuple(self.buckets) if self.buckets[-1] == self.seq_len else tuple(self.buckets) + (self.seq_len,)
        return tuple(sorted({max(self.seq_len // d, 1) for d in (8, 4, 2, 1)}))

    @classmethod
    def from_config(cls, config: Any) -> SFTDataConfig:
        """From a ConfigDict / dict / dataclass; unknown keys are refused by name."""
        if hasattr(config, "to_dict"):
            values = config.to_dict()
        elif dataclasses.is_dataclass(config):
            values = dataclasses.asdict(config)
        elif isinstance(config, Mapping):
            values = dict(config)
        else:
            raise TypeError(f"data config must be a ConfigDict, dict or dataclass, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"data config: unknown key(s) {unknown}; known keys are {sorted(known)}")
        if isinstance(values.get("sources"), str):
            values["sources"] = (values["sources"],)
        for key in ("sources", "buckets", "difficulty_levels"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        if isinstance(values.get("template_kwargs"), Mapping):
            values["template_kwargs"] = tuple(sorted(values["template_kwargs"].items()))
        return cls(**values)


class _SafeRows:
    """Parsed rows; with on_malformed="skip" a bad row becomes a skip marker instead of raising."""

    def __init__(self, parsed: sources_lib.ParsedSource, raise_malformed: bool):
        self._parsed, self._raise = parsed, raise_malformed

    def __len__(self) -> int:
        return len(self._parsed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self._parsed[index]
        except sources_lib.MalformedRowError as e:
            if self._raise:
                raise
            return skipped(SKIP_MALFORMED, str(e))


class EpochOrderDataset(grain.MapDataset):
    """Index i -> parent[order_e[i % n]] with e = i // n: a fresh order for every epoch."""

    def __init__(
        self,
        parent: grain.MapDataset,
        *,
        order: str,
        seed: int,
        num_epochs: int | None,
        difficulties: np.ndarray | None = None,
    ):
        super().__init__(parent)
        self._n = len(parent)
        self._order, self._seed, self._num_epochs = order, seed, num_epochs
        self._difficulties = difficulties
        self._orders: dict[int, np.ndarray] = {}
        if order == "curriculum" and (difficulties is None or len(difficulties) != self._n):
            raise ValueError("curriculum order needs one difficulty per row")

    def __len__(self) -> int:
        return sys.maxsize if self._num_epochs is None else self._n * self._num_epochs

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row order of one epoch: a pure function of (order, seed, epoch)."""
        if epoch not in self._orders:
            if self._order == "sequential":
                order = np.arange(self._n)
            else:
                order = np.random.default_rng([self._seed, epoch]).permutation(self._n)
                if self._order == "curriculum":
                    order = order[np.argsort(self._difficulties[order], kind="stable")]
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # keep two epochs
            self._orders[epoch] = order
        return self._orders[epoch]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        epoch, k = divmod(int(index), self._n)
        return self._parent[int(self.epoch_order(epoch)[k])]

    def __str__(self) -> str:
        return f"EpochOrderDataset(order={self._order}, seed={self._seed}, num_epochs={self._num_epochs})"


class SFTBatchIterator(grain.DatasetIterator):
    """Yields dicts of int32 [batch_size, T] arrays; checkpointable with get_state/set_state."""

    def __init__(
        self, examples: grain.MapDataset, config: SFTDataConfig, pad_id: int, fingerprint: str, rows_per_epoch: int
    ):
        super().__init__()
        self._examples, self._config, self._pad_id, self._fingerprint = examples, config, pad_id, fingerprint
        self._rows_per_epoch = rows_per_epoch
        self._reset({"next_index": 0, "stats": {}, "buffers": {}})

    def _reset(self, state: Mapping[str, Any]) -> None:
        self._next = int(state["next_index"])
        self._counts = {k: int(state["stats"].get(k, 0)) for k in STAT_KEYS}
        self._buffers = {b: [int(i) for i in state["buffers"].get(str(b), [])] for b in self._config.bucket_lengths}
        self._held: dict[int, dict[str, Any]] = {}
        self._skips_in_a_row = 0
        self._logged_skips = 0

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    def get_state(self) -> dict[str, Any]:
        return {
            "next_index": self._next,
            "stats": dict(self._counts),
            "fingerprint": self._fingerprint,
            "buffers": {str(b): list(v) for b, v in self._buffers.items() if v},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                "data iterator state was saved for a different data pipeline (sources, order, seed, "
                "shapes or sharding changed); refusing to resume from it"
            )
        self._reset(state)

    def _read(self, index: int) -> dict[str, Any]:
        if index not in self._held:
            self._held = {i: ex for i, ex in self._held.items() if i in self._buffered_indices()}
            self._held[index] = self._examples[index]
        return self._held[index]

    def _buffered_indices(self) -> set[int]:
        return {i for v in self._buffers.values() for i in v} | {self._next}

    def _take(self) -> dict[str, Any] | None:
        """Reads the next example; counts and returns None for a skipped one."""
        example = self._read(self._next)
        if "skip" not in example:
            self._skips_in_a_row = 0
            return example
        self._next += 1
        self._counts[f"skipped_{example['skip']}"] += 1
        self._skips_in_a_row += 1
        if self._logged_skips < _MAX_LOGGED_SKIPS:
            self._logged_skips += 1
            detail = example.get("detail") or ""
            logger.warning(
                "skipping SFT example %d of the stream: %s%s",
                self._next - 1,
                example["skip"],
                f" ({detail})" if detail else "",
            )
        if self._skips_in_a_row > self._rows_per_epoch:
            raise ValueError(f"every SFT example is being skipped: {self._counts}")
        return None

    def _count(self, example: dict[str, Any]) -> None:
        self._counts["examples"] += 1
        self._counts["truncated"] += int(example["truncated"])
        self._counts["tokens"] += len(example["tokens"])
        self._counts["loss_tokens"] += int(example["loss_mask"][1:].sum())

    def __next__(self) -> dict[str, np.ndarray]:
        return self._next_packed() if self._config.mode == "pack" else self._next_bucketed()

    def _next_packed(self) -> dict[str, np.ndarray]:
        size, length = self._config.batch_size, self._config.seq_len
        rows, current, used = [], [], 0
        while len(rows) < size:
            if self._next >= len(self._examples):
                if current:
                    rows.append(current)
                    current, used = [], 0
                    continue
                if not rows:
                    raise StopIteration
                rows.extend([[]] * (size - len(rows)))
                break
            example = self._take()
            if example is None:
                continue
            if current and used + len(example["tokens"]) > length:
                rows.append(current)  # the example starts the next row; it is read again then
                current, used = [], 0
                continue
            current.append((example["tokens"], example["loss_mask"]))
            used += len(example["tokens"])
            self._count(example)
            self._next += 1
        return packing.stack_rows([packing.make_row(r, length, self._pad_id) for r in rows])

    def _next_bucketed(self) -> dict[str, np.ndarray]:
        size, buckets = self._config.batch_size, self._config.bucket_lengths
        while True:
            ready = [b for b in buckets if len(self._buffers[b]) >= size]
            exhausted = self._next >= len(self._examples)
            if not ready and exhausted:
                ready = [b for b in buckets if self._buffers[b]]
                if not ready:
                    raise StopIteration
            if ready:
                b = ready[0]
                indices, self._buffers[b] = self._buffers[b][:size], self._buffers[b][size:]
                rows = [
                    packing.make_row([(self._read(i)["tokens"], self._read(i)["loss_mask"])], b, self._pad_id)
                    for i in indices
                ]
                rows += [packing.empty_row(b, self._pad_id)] * (size - len(rows))
                return packing.stack_rows(rows)
            example = self._take()
            if example is None:
                continue
            self._count(example)  # tokenisation truncated it to seq_len, the largest bucket
            self._buffers[packing.smallest_bucket(len(example["tokens"]), buckets)].append(self._next)
            self._next += 1


class SFTDataset(grain.IterDataset):
    """IterDataset face of the pipeline, so grain wrappers (e.g. prefetch) can be stacked on it."""

    def __init__(
        self, examples: grain.MapDataset, config: SFTDataConfig, pad_id: int, fingerprint: str, rows_per_epoch: int
    ):
        super().__init__()
        self._args = (examples, config, pad_id, fingerprint, rows_per_epoch)

    def __iter__(self) -> SFTBatchIterator:
        return SFTBatchIterator(*self._args)

    def __str__(self) -> str:
        return f"SFTDataset(mode={self._args[1].mode}, order={self._args[1].order})"


def _curriculum_difficulties(parsed: sources_lib.ParsedSource, raise_malformed: bool) -> np.ndarray:
    values = parsed.difficulties()
    missing = []
    for i in np.flatnonzero(np.isnan(values)):
        try:
            parsed[int(i)]
        except sources_lib.MalformedRowError:
            if raise_malformed:
                raise
            continue  # skipped later anyway; NaN sorts last
        missing.append(int(i))
    if missing:
        raise ValueError(
            f"curriculum order needs a '{parsed.parse_kwargs['difficulty_key']}' on every row; "
            f"{len(missing)} row(s) have none, e.g. rows {missing[:5]} of {parsed.name}"
        )
    return values


def make_sft_dataset(config: Any, tokenizer: Tokenizer) -> grain.IterDataset:
    """The pipeline as a grain IterDataset (wrapped in a background-thread prefetch if `prefetch` > 0)."""
    cfg = config if isinstance(config, SFTDataConfig) else SFTDataConfig.from_config(config)
    rows = sources_lib.open_sources(cfg.sources, split=cfg.split, data_dir=cfg.tfds_data_dir)
    parsed = sources_lib.ParsedSource(
        rows,
        messages_key=cfg.messages_key,
        prompt_key=cfg.prompt_key,
        response_key=cfg.response_key,
        difficulty_key=cfg.difficulty_key,
        difficulty_levels=cfg.difficulty_levels or None,
        system_prompt=cfg.system_prompt,
    )
    if len(parsed) == 0:
        raise ValueError(f"data source {parsed.name} has no rows")
    raise_malformed = cfg.on_malformed == "raise"
    difficulties = _curriculum_difficulties(parsed, raise_malformed) if cfg.order == "curriculum" else None
    template = cfg.chat_template
    if template in BUILTIN_TEMPLATES:
        template = builtin_template(template)
    if template is None and tokenizer.chat_template is None:
        raise ValueError(
            f"the tokenizer has no chat_template; set data.chat_template to a template or to one of {BUILTIN_TEMPLATES}"
        )
    options = TokenizeOptions(
        max_length=cfg.seq_len,
        completion_mode=cfg.completion_mode,
        chat_template=template,
        template_kwargs=cfg.template_kwargs,
    )

    def tokenize(example):
        return example if "skip" in example else tokenize_example(example, tokenizer, options)

    ds = grain.MapDataset.source(_SafeRows(parsed, raise_malformed))
    ds = EpochOrderDataset(ds, order=cfg.order, seed=cfg.seed, num_epochs=cfg.num_epochs, difficulties=difficulties)
    if cfg.shard_count > 1:
        ds = ds[cfg.shard_index :: cfg.shard_count]
    ds = ds.map(tokenize)
    # What the saved indices refer to: the example stream and, for buckets, the buffers' keys.
    stream_keys = (
        "sources",
        "split",
        "order",
        "seed",
        "num_epochs",
        "shard_index",
        "shard_count",
        "difficulty_key",
        "difficulty_levels",
        "mode",
    )
    identity = {k: getattr(cfg, k) for k in stream_keys}
    identity.update(rows=len(parsed), buckets=cfg.bucket_lengths if cfg.mode == "bucket" else None)
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    rows_per_epoch = -(-len(parsed) // cfg.shard_count)
    dataset = SFTDataset(ds, cfg, tokenizer.pad_token_id, fingerprint, rows_per_epoch)
    if cfg.prefetch:
        dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=cfg.prefetch)
    return dataset


def make_sft_iterator(config: Any, tokenizer: Tokenizer) -> grain.DatasetIterator:
    """The data section of a config (ConfigDict / dict / SFTDataConfig) -> a checkpointable iterator."""
    return iter(make_sft_dataset(config, tokenizer))


def iterator_stats(iterator: grain.DatasetIterator) -> dict[str, int]:
    """Cumulative counters as of the last batch handed out (also through a prefetch wrapper)."""
    return dict(iterator.get_state()["stats"])
