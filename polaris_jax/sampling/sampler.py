"""`generate`: validates the request, pads it into buckets, drives the compiled loop, unpads the result."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from polaris_jax.models import cpu_gemm
from polaris_jax.models.sharding import DEFAULT_RULES, logical_to_spec, shard_count, to_host
from polaris_jax.models.transformer import per_layer, unstack_layers
from polaris_jax.sampling import decode_loop
from polaris_jax.sampling.buckets import Buckets, round_up
from polaris_jax.sampling.strategies import SamplingSettings

PAD_ID = 0  # written into left-padding slots, which are masked out
# Smallest stop-criteria shapes: typical requests (a few EOS ids, a few short stop sequences) share one
# compiled program; larger ones round up to the next power of two.
MIN_EOS_IDS, MIN_STOP_SEQUENCES, MIN_STOP_LENGTH = 4, 4, 8
DEFAULT_PREFILL_CHUNK = 2048  # prompt tokens per prefill pass (see decode_loop._prefill)
_unstack = jax.jit(unstack_layers)
_unstack_and_pack = jax.jit(lambda params: cpu_gemm.pack_projections(unstack_layers(params)))
# The per-layer copy of the last params `generate` unstacked, with weak references to their leaves:
# repeated calls on the same params (evaluation, benchmarks) reuse it. Fresh buffers are expensive on
# CPU (1.9 GB of page faults cost 0.1-3 s here). It is dropped once those params are garbage collected.
_last_unstacked: dict = {}


def _unstacked(params, pack: bool):
    """The decode layout of `params`. The base weights' copy is cached; adapter leaves (small, and new at
    every adapter change) are sliced per layer afresh, so changing an adapter never repacks the base."""
    params, adapter = _split_adapter(params)
    leaves = jax.tree.leaves(params)
    hit = _last_unstacked.get("entry")
    if (
        hit is not None
        and hit[2] == pack
        and len(hit[0]) == len(leaves)
        and all(r() is x for r, x in zip(hit[0], leaves))
    ):
        return _with_adapter_layers(hit[1], adapter)
    _last_unstacked.clear()  # free the old copy before making the new one
    layers = (_unstack_and_pack if pack else _unstack)(params)
    if leaves and all(isinstance(x, jax.Array) for x in leaves):
        token = object()
        _last_unstacked.update(entry=([weakref.ref(x) for x in leaves], layers, pack), token=token)
        weakref.finalize(leaves[0], _forget_unstacked, token)
    return _with_adapter_layers(layers, adapter)


def _split_adapter(params):
    """(params without LoRA leaves, the LoRA leaves in the same layout)."""
    base, adapter = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            base[key] = {n: x for n, x in value.items() if "_lora_" not in n}
            lora = {n: x for n, x in value.items() if "_lora_" in n}
            if lora:
                adapter[key] = lora
        else:
            (adapter if "_lora_" in key else base)[key] = value
    return base, adapter


@jax.jit
def _adapter_per_layer(adapter):
    return {k: per_layer(v) if isinstance(v, dict) else v for k, v in adapter.items()}


def _with_adapter_layers(layers: dict, adapter: dict) -> dict:
    if not adapter:
        return layers
    out = dict(layers)
    for key, value in _adapter_per_layer(adapter).items():
        if isinstance(value, tuple):
            out[key] = tuple({**layer, **leaves} for layer, leaves in zip(layers[key], value))
        else:
            out[key] = value
    return out


def _forget_unstacked(token):
    if _last_unstacked.get("token") is token:
        _last_unstacked.clear()


def kv_dtype(config):
    """The KV cache's dtype: the compute dtype, except float32 for a 16-bit model on CPU (BENCHMARKS.md)."""
    if jax.default_backend() == "cpu" and jnp.dtype(config.dtype).itemsize < 4:
        return jnp.float32
    return None


def decode_params(config, params, mesh=None, unstack_params: bool | None = None, pack_weights: bool | None = None):
    """The params in the layout decoding reads fastest (see `generate`'s unstack_params and pack_weights)."""
    if unstack_params is None:
        unstack_params = jax.default_backend() == "cpu"
    if pack_weights is not False:
        # Only where the kernel computes what XLA would: weights stored in the compute dtype.
        dtype_ok = (
            jnp.dtype(config.dtype) == jnp.dtype(config.weight_dtype) and jnp.dtype(config.dtype) in cpu_gemm.TARGETS
        )
        can_pack = bool(unstack_params) and mesh is None and dtype_ok and cpu_gemm.available()
        if pack_weights and not can_pack:
            raise ValueError(
                "pack_weights=True needs unstack_params, no mesh, float32 or bfloat16 weights in the "
                "compute dtype, the CPU backend and a C++ compiler for models/cpu_gemm.cc"
            )
        pack_weights = can_pack
    if unstack_params:
        params = _unstacked(params, bool(pack_weights))
    return params


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Padded arrays; sample j of prompt i is row i·n + j.

    tokens_br: int32 [B, max_new_tokens] generated ids, up to and including the EOS id or the last token of
      the stop sequence, then 0.
    logprobs_br: float32 [B, max_new_tokens] log-probability of each token under the temperature-scaled
      distribution before top-k / top-p / min-p truncation (verl's convention; temperature 1 for greedy).
    lengths_b: int32 [B] generated tokens per row.
    finish_b: int32 [B] FINISH_EOS, FINISH_STOP (a stop sequence) or FINISH_LENGTH (max_new_tokens reached).

    `tokens`, `logprobs` and `finish_reasons` are the same as Python lists ("eos", "stop", "length").
    """

    tokens_br: np.ndarray
    logprobs_br: np.ndarray
    lengths_b: np.ndarray
    finish_b: np.ndarray
    routed_experts: tuple | None = None  # the engine's, per row (`Completion.routed_experts`), when recorded

    @property
    def tokens(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens_br, self.lengths_b)]

    @property
    def logprobs(self) -> list[list[float]]:
        return [row[:n].tolist() for row, n in zip(self.logprobs_br, self.lengths_b)]

    @property
    def finish_reasons(self) -> list[str]:
        return [decode_loop.FINISH_REASONS[int(code)] for code in self.finish_b]


def _check_ids(name: str, ids, vocab_size: int) -> list[int]:
    ids = list(ids)
    if not ids:
        raise ValueError(f"{name} is empty")
    for token in ids:
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
            raise ValueError(f"{name} holds {token!r}, not an integer token id")
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name} holds token id {token} outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]


def _stop_criteria(eos_token_ids, stop_sequences, max_new_tokens: int, vocab_size: int):
    """Host arrays of `StopCriteria`, padded to power-of-two shapes so new stop lists rarely recompile."""
    eos = _check_ids("eos_token_ids", eos_token_ids, vocab_size) if len(eos_token_ids) else []
    stops = [_check_ids(f"stop_sequences[{i}]", s, vocab_size) for i, s in enumerate(stop_sequences)]
    eos_ids = np.full(round_up(max(len(eos), 1), None, MIN_EOS_IDS), -1, np.int32)
    eos_ids[: len(eos)] = eos
    width = round_up(max([len(s) for s in stops] + [1]), None, MIN_STOP_LENGTH)
    stop_ql = np.full((round_up(max(len(stops), 1), None, MIN_STOP_SEQUENCES), width), -1, np.int32)
    stop_len_q = np.zeros(stop_ql.shape[0], np.int32)
    for i, seq in enumerate(stops):
        stop_ql[i, width - len(seq) :] = seq
        stop_len_q[i] = len(seq)
    return decode_loop.StopCriteria(
        eos_ids=eos_ids, stop_ql=stop_ql, stop_len_q=stop_len_q, max_new_tokens=np.int32(max_new_tokens)
    )


def batch_shards(mesh, rules) -> int:
    if mesh is None:
        return 1
    return shard_count(mesh, logical_to_spec(("batch",), mesh, rules))


def put(tree, mesh, rules, *, rows: bool):
    """Explicit host -> device transfer; with a mesh, `rows` arrays are split over the batch axes."""
    if mesh is None:
        return jax.device_put(tree)

    def one(x):
        # In JAX's dtype first: multi-process device_put checks that every process passed the same value,
        # and a float64 1.4 differs from the float32 1.4 it would become.
        x = np.asarray(x)
        x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype))
        axes = ("batch",) + (None,) * (np.ndim(x) - 1) if rows else (None,) * np.ndim(x)
        return jax.device_put(x, NamedSharding(mesh, logical_to_spec(axes, mesh, rules, np.shape(x))))

    return jax.tree.map(one, tree)


def _check_params_on_mesh(params, mesh):
    devices = set(mesh.devices.flat)
    for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.Array) and not leaf.sharding.device_set <= devices:
            raise ValueError(
                "params live outside the mesh passed as mesh=; place them with "
                "models.sharding.shard_params(params, param_shardings(config, mesh)) first"
            )


def _pack_batch(prompts, n: int, width: int, buckets: Buckets, shards: int):
    """Host arrays: left-padded prompts (padded with dummy rows to a batch bucket), and for each decode
    row (prompts x n, padded to its own bucket) its prompt, its id and whether it is real."""
    rows = len(prompts) * n
    prefill_batch, decode_batch = buckets.batch_size(len(prompts), shards), buckets.batch_size(rows, shards)
    prompt_gt = np.full((prefill_batch, width), PAD_ID, np.int32)
    prompt_len_g = np.zeros(prefill_batch, np.int32)
    for i, prompt in enumerate(prompts):
        prompt_gt[i, width - len(prompt) :] = prompt
        prompt_len_g[i] = len(prompt)
    row_b = np.arange(decode_batch, dtype=np.int32)
    row_src_b = np.where(row_b < rows, row_b // n, 0).astype(np.int32)
    return prompt_gt, prompt_len_g, row_src_b, row_b, row_b < rows


def generate(
    config,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    n: int = 1,
    eos_token_ids: Sequence[int] = (),
    seed: int = 0,
    min_p: float = 0.0,
    stop_sequences: Sequence[Sequence[int]] = (),
    mesh=None,
    rules=DEFAULT_RULES,
    buckets: Buckets = Buckets(),
    unstack_params: bool | None = None,
    compact_rows: bool = True,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    pack_weights: bool | None = None,
    max_new_tokens_per_prompt: Sequence[int] | None = None,
) -> SampleOutput:
    """Samples n continuations of every prompt; see the package docstring for the design.

    Args:
      prompts: token-id lists of any lengths (left-padded internally).
      max_new_tokens: per-row cap on generated tokens.
      max_new_tokens_per_prompt: each prompt's own cap (<= max_new_tokens), for all its n rows; None: none.
      temperature: 0 means greedy; top_p, top_k (0 = off), min_p (0 = off) truncate after scaling.
      n: samples per prompt; they share one prefill.
      eos_token_ids: ids that end a row (finish reason "eos"); none by default.
      seed: row r of the output draws from fold_in(key(seed), r) whatever the batch around it.
      stop_sequences: token sequences that end a row once generated (finish reason "stop").
      mesh, rules: shard the decode batch over the mesh's batch axes; params must already be placed
        on the mesh (models.sharding.param_shardings).
      buckets: prompt-length, batch and cache-length buckets.
      compact_rows: when the cache grows into its next bucket, drop finished rows into a smaller batch
        bucket (their outputs are fetched first), so a long tail decodes with few rows.
      prefill_chunk: prompt buckets longer than this (and a multiple of it, as power-of-two buckets
        are) prefill in passes of this many tokens, bounding prefill activations; 0 = one pass.
      unstack_params: copy the stacked layer weights into one buffer per layer (default: on CPU, where
        XLA would otherwise copy every layer's weights out of the stack at every step). The copy of the
        latest params is kept for the next call until those params are garbage collected.
      pack_weights: with the per-layer copy, store the projection weights as column panels for the
        `models.cpu_gemm` kernel (default: on when unstacking, without a mesh, for float32 or bfloat16
        weights in the compute dtype, if the kernel builds; BENCHMARKS.md "CPU matmul kernel").
    """
    if not prompts:
        raise ValueError("prompts is empty")
    prompts = [_check_ids(f"prompts[{i}]", p, config.vocab_size) for i, p in enumerate(prompts)]
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be a positive integer")
    if int(n) != n or n < 1:
        raise ValueError(f"n={n} must be a positive integer")
    budget_g = np.full(len(prompts), max_new_tokens, np.int32)
    if max_new_tokens_per_prompt is not None:
        budget_g = np.asarray(max_new_tokens_per_prompt, np.int32)
        if budget_g.shape != (len(prompts),) or budget_g.min() < 1 or budget_g.max() > max_new_tokens:
            raise ValueError(
                f"max_new_tokens_per_prompt needs one integer in [1, max_new_tokens={max_new_tokens}] per prompt"
            )
    if int(prefill_chunk) != prefill_chunk or prefill_chunk < 0:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be an integer >= 0")
    if int(seed) != seed or not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed} must be an integer in [0, 2**31)")
    if mesh is not None:
        _check_params_on_mesh(params, mesh)
    settings = SamplingSettings.create(temperature, top_p, top_k, min_p, vocab_size=config.vocab_size)
    criteria = _stop_criteria(eos_token_ids, stop_sequences, max_new_tokens, config.vocab_size)

    shards = batch_shards(mesh, rules)
    width = buckets.prompt_length(max(len(p) for p in prompts))
    buckets.cache_length(width + max_new_tokens - 1)  # fails now, not mid-generation, if no bucket is large enough
    batch = _pack_batch(prompts, n, width, buckets, shards)
    _, _, host_src_b, _, host_live_b = batch
    budget_b = np.where(host_live_b, budget_g[host_src_b], 0).astype(np.int32)  # dummy rows: 0
    prompt_gt, prompt_len_g, row_src_b, row_id_b, row_live_b, budget_b = put((*batch, budget_b), mesh, rules, rows=True)
    settings, criteria, seed_arr = put((settings, criteria, np.int32(seed)), mesh, rules, rows=False)
    rows = len(prompts) * n

    params = decode_params(config, params, mesh, unstack_params, pack_weights)
    # On CPU a 16-bit cache costs more than its bytes save: XLA copies it at every write (BENCHMARKS.md).
    cache_dtype = kv_dtype(config)
    cache_len = buckets.cache_length(width + 1)
    state = decode_loop.start(
        config,
        params,
        prompt_gt,
        prompt_len_g,
        row_src_b,
        row_id_b,
        row_live_b,
        seed_arr,
        settings,
        criteria,
        cache_len=cache_len,
        cache_dtype=cache_dtype,
        prefill_chunk=int(prefill_chunk),
        mesh=mesh,
        rules=rules,
        budget_b=budget_b,
    )
    row_of_b = np.arange(len(row_src_b))  # the output row each decode row holds; >= rows: a dummy
    outputs = SampleOutput(
        tokens_br=np.zeros((rows, int(max_new_tokens)), np.int32),
        logprobs_br=np.zeros((rows, int(max_new_tokens)), np.float32),
        lengths_b=np.zeros(rows, np.int32),
        finish_b=np.full(rows, decode_loop.RUNNING, np.int32),
    )
    while True:
        state = decode_loop.decode(config, params, state, settings, criteria, mesh=mesh, rules=rules)
        done_b = to_host(state.done_b)
        if done_b.all():
            break
        cache_len = buckets.cache_length(cache_len + 1)
        live_b = np.flatnonzero(~done_b)
        live_batch = buckets.batch_size(len(live_b), shards)
        keep_b = None
        if compact_rows and live_batch < len(done_b):
            _collect_finished(state, row_of_b, rows, width - 1, outputs)
            keep_b = np.concatenate([live_b, np.flatnonzero(done_b)[: live_batch - len(live_b)]]).astype(np.int32)
            row_of_b = np.where(np.arange(live_batch) < len(live_b), row_of_b[keep_b], rows)  # fillers: dummies
            keep_b = put(keep_b, mesh, rules, rows=False)
        state = decode_loop.grow(state, keep_b, cache_len=cache_len, mesh=mesh, rules=rules)
    _collect_finished(state, row_of_b, rows, width - 1, outputs)
    return outputs


def _collect_finished(state, row_of_b, rows: int, first: int, outputs: SampleOutput) -> None:
    """Copies every finished real row's tokens, logprobs, length and finish code into `outputs` (once)."""
    tokens_bs, logprobs_bs, num_new_b, reason_b = to_host(
        (state.tokens_bs, state.logprobs_bs, state.num_new_b, state.reason_b)
    )
    for d, row in enumerate(row_of_b):
        if row < rows and outputs.finish_b[row] == decode_loop.RUNNING and reason_b[d] != decode_loop.RUNNING:
            n = int(num_new_b[d])
            outputs.tokens_br[row, :n] = tokens_bs[d, first : first + n]
            outputs.logprobs_br[row, :n] = logprobs_bs[d, first : first + n]
            outputs.lengths_b[row], outputs.finish_b[row] = n, reason_b[d]
