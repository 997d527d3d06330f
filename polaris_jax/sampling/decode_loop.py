"""The jitted state machine: shared prefill, the per-bucket decode `while_loop`, and cache growth.

Three compiled functions, each keyed only by bucketed shapes (and the static config / settings):
  start(prefill batch, prompt bucket, decode batch, first cache bucket)
  decode(decode batch, cache bucket)
  grow(decode batch, cache bucket -> next bucket), optionally keeping only some rows (compaction)
Slot layout: prompts are left-padded to width P, so slot s of every row holds prompt token s - (P - len)
for s < P, and `tokens_bs[:, s]` holds the token *predicted* at slot s. Generated token g of a row is
thus at slot P - 1 + g, and is fed to the model at slot P + g.

Suffixes (CONTRIBUTING.md): g the distinct prompts of the prefill, b the decode rows (n per prompt),
s cache slots, c prefill-chunk positions, q stop sequences, l positions within a stop sequence.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from polaris_jax.models import forward, init_cache, lm_head, moe
from polaris_jax.models.attention import HeadMajorKV
from polaris_jax.models.sharding import DEFAULT_RULES, logical_to_spec
from polaris_jax.sampling.strategies import SamplingSettings, sample

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
FINISH_REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopCriteria:
    """When a row finishes. Shapes are bucketed; -1 pads never match a token."""

    eos_ids: jax.Array  # int32 [E] end-of-sequence ids
    stop_ql: jax.Array  # int32 [S, L] stop sequences, right-aligned, left-padded with -1 (wildcard)
    stop_len_q: jax.Array  # int32 [S] true lengths; 0 marks a padding row that never matches
    max_new_tokens: jax.Array  # int32 []


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: dict  # models.attention per-layer cache: k, v tuples of HeadMajorKV, valid_bs [B, S], end []
    next_token_b: jax.Array  # int32: sampled, not yet fed to the model
    tokens_bs: jax.Array  # int32: token predicted at each slot
    logprobs_bs: jax.Array  # float32: its log-probability (see strategies.sample)
    num_new_b: jax.Array  # int32: tokens generated so far
    budget_b: jax.Array  # int32: the row's own cap on new tokens (at most criteria.max_new_tokens)
    done_b: jax.Array  # bool; dummy rows start done
    reason_b: jax.Array  # int32: RUNNING / EOS / STOP / LENGTH
    window_bl: jax.Array  # int32: the last L generated tokens, for stop sequences (-2 before any)
    prompt_len_b: jax.Array  # int32: real prompt tokens; positions continue from here
    row_key_b: jax.Array  # typed PRNG keys, one per row, folded from (seed, row id)
    prompt_width: jax.Array  # int32 []: P, the first generated token's feed slot

    def replace(self, **changes) -> DecodeState:
        return dataclasses.replace(self, **changes)


def _kv_axes(kv: HeadMajorKV):
    if kv.keys:
        return kv.replace_data(("batch", "kv_heads", "head_dim", "length"))
    return kv.replace_data(("batch", "kv_heads", "length", "head_dim"))


def _state_axes(state: DecodeState) -> DecodeState:
    """Logical axis names of every state leaf (the cache is the per-layer decode layout)."""
    cache = state.cache
    return DecodeState(
        cache=dict(
            k=tuple(map(_kv_axes, cache["k"])), v=tuple(map(_kv_axes, cache["v"])), valid_bs=("batch", "length"), end=()
        ),
        next_token_b=("batch",),
        tokens_bs=("batch", "length"),
        logprobs_bs=("batch", "length"),
        num_new_b=("batch",),
        budget_b=("batch",),
        done_b=("batch",),
        reason_b=("batch",),
        window_bl=("batch", None),
        prompt_len_b=("batch",),
        row_key_b=("batch",),
        prompt_width=(),
    )


def _constrain(state: DecodeState, mesh, rules) -> DecodeState:
    """Pins the decode batch to the mesh's batch axes (and kv heads to tensor) when sharded."""
    if mesh is None:
        return state
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    shardings = jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, mesh, rules, x.shape)),
        _state_axes(state),
        state,
        is_leaf=is_axes,
    )
    return jax.lax.with_sharding_constraint(state, shardings)


def _map_kv(cache: dict, fn) -> dict:
    """Applies fn(array, length_axis) to every layer's keys and values (batch is axis 0)."""
    return dict(
        cache,
        k=tuple(kv.replace_data(fn(kv.data, kv.length_axis)) for kv in cache["k"]),
        v=tuple(kv.replace_data(fn(kv.data, kv.length_axis)) for kv in cache["v"]),
    )


def _stop_match_b(window_bl, criteria: StopCriteria):
    """[B] True where the last generated tokens end with one of the stop sequences."""
    length = criteria.stop_ql.shape[1]
    tail_bl = window_bl[:, window_bl.shape[1] - length :]
    hit_dsl = (tail_bl[:, None, :] == criteria.stop_ql[None]) | (criteria.stop_ql[None] == -1)
    return jnp.any(jnp.all(hit_dsl, axis=-1) & (criteria.stop_len_q[None] > 0), axis=-1)


def _record(state: DecodeState, logits_dv, slot, settings: SamplingSettings, criteria: StopCriteria):
    """Samples the next token of every running row from the logits at `slot` and updates who is done."""
    keys_b = jax.vmap(jax.random.fold_in)(state.row_key_b, state.num_new_b)
    token_b, logprob_b = sample(logits_dv, keys_b, settings)
    live_b = ~state.done_b
    token_b = jnp.where(live_b, token_b, 0)
    tokens_bs = jax.lax.dynamic_update_slice_in_dim(state.tokens_bs, token_b[:, None], slot, axis=1)
    logprobs_bs = jax.lax.dynamic_update_slice_in_dim(
        state.logprobs_bs, jnp.where(live_b, logprob_b, 0.0)[:, None], slot, axis=1
    )
    num_new_b = state.num_new_b + live_b.astype(jnp.int32)
    shifted_bl = jnp.concatenate([state.window_bl[:, 1:], token_b[:, None]], axis=1)
    window_bl = jnp.where(live_b[:, None], shifted_bl, state.window_bl)
    is_eos_b = jnp.any(token_b[:, None] == criteria.eos_ids[None], axis=-1)
    is_stop_b = _stop_match_b(window_bl, criteria)
    is_length_b = num_new_b >= jnp.minimum(criteria.max_new_tokens, state.budget_b)
    reason_b = jnp.select(
        [~live_b, is_eos_b, is_stop_b, is_length_b],
        [
            state.reason_b,
            jnp.full_like(state.reason_b, EOS),
            jnp.full_like(state.reason_b, STOP),
            jnp.full_like(state.reason_b, LENGTH),
        ],
        state.reason_b,
    )
    return state.replace(
        next_token_b=jnp.where(live_b, token_b, state.next_token_b),
        tokens_bs=tokens_bs,
        logprobs_bs=logprobs_bs,
        num_new_b=num_new_b,
        done_b=state.done_b | (reason_b != RUNNING),
        reason_b=reason_b,
        window_bl=window_bl,
    )


def _pad_length(x, axis: int, size: int, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _prefill(config, params, prompt_gt, positions_gt, segment_gt, cache, chunk: int):
    """The prompt's forward pass into the cache; returns (last position's hidden [G, 1, D], cache).

    With 0 < chunk < P (and P a multiple of it) the prompt runs as P / chunk passes of `chunk` tokens
    under one `lax.scan`, each attending to the cache written so far, so activations are those of
    one chunk."""
    p = prompt_gt.shape[1]
    if not 0 < chunk < p or p % chunk:
        hidden_btd, cache = forward(
            config, params, prompt_gt, positions_gt, segment_ids_bt=segment_gt, cache=cache, return_hidden=True
        )
        return hidden_btd[:, -1:], cache
    chunks = lambda x: jnp.swapaxes(x.reshape(x.shape[0], p // chunk, chunk), 0, 1)

    def one_chunk(cache, xs):
        tokens_gc, positions_gc, segment_gc = xs
        hidden_bcd, cache = forward(
            config, params, tokens_gc, positions_gc, segment_ids_bt=segment_gc, cache=cache, return_hidden=True
        )
        return cache, hidden_bcd[:, -1:]

    cache, last_hidden = jax.lax.scan(one_chunk, cache, (chunks(prompt_gt), chunks(positions_gt), chunks(segment_gt)))
    return last_hidden[-1], cache


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "cache_dtype", "prefill_chunk", "mesh", "rules"))
def start(
    config,
    params,
    prompt_gt,
    prompt_len_g,
    row_src_b,
    row_id_b,
    row_live_b,
    seed,
    settings,
    criteria,
    *,
    cache_len: int,
    cache_dtype=None,
    prefill_chunk: int = 0,
    mesh=None,
    rules=DEFAULT_RULES,
    budget_b=None,
) -> DecodeState:
    """Prefills each distinct prompt once, broadcasts its cache to its n rows, samples the first token.

    cache_dtype: the KV cache's dtype (None: the model's compute dtype).
    prefill_chunk: tokens per prefill pass (0: the whole prompt bucket at once; see `_prefill`).
    budget_b: int32 [B] each decode row's cap on new tokens (None: criteria.max_new_tokens for every row)."""
    b, p = prompt_gt.shape
    segment_gt = (jnp.arange(p)[None, :] >= p - prompt_len_g[:, None]).astype(jnp.int32)
    positions_gt = jnp.maximum(jnp.cumsum(segment_gt, axis=1) - 1, 0).astype(jnp.int32)
    with moe.mesh_context(config, mesh, rules):
        last_hidden_g1d, cache = _prefill(
            config,
            params,
            prompt_gt,
            positions_gt,
            segment_gt,
            init_cache(config, b, p, cache_dtype, per_layer=True),
            prefill_chunk,
        )
    last_logits_gv = lm_head(config, params, last_hidden_g1d)[:, 0]
    rows = functools.partial(jnp.take, indices=row_src_b, axis=0)
    cache = _map_kv(cache, lambda x, length_axis: _pad_length(rows(x), length_axis, cache_len))
    d = row_src_b.shape[0]
    window_len = criteria.stop_ql.shape[1]
    state = DecodeState(
        cache=dict(cache, valid_bs=_pad_length(rows(cache["valid_bs"]), 1, cache_len, False)),
        next_token_b=jnp.zeros((d,), jnp.int32),
        tokens_bs=jnp.zeros((d, cache_len), jnp.int32),
        logprobs_bs=jnp.zeros((d, cache_len), jnp.float32),
        num_new_b=jnp.zeros((d,), jnp.int32),
        budget_b=jnp.broadcast_to(criteria.max_new_tokens, (d,)) if budget_b is None else budget_b,
        done_b=~row_live_b,
        reason_b=jnp.zeros((d,), jnp.int32),
        window_bl=jnp.full((d, window_len), -2, jnp.int32),
        prompt_len_b=rows(prompt_len_g),
        prompt_width=jnp.asarray(p, jnp.int32),
        row_key_b=jax.vmap(functools.partial(jax.random.fold_in, jax.random.key(seed)))(row_id_b),
    )
    state = _record(_constrain(state, mesh, rules), rows(last_logits_gv), p - 1, settings, criteria)
    return _constrain(state, mesh, rules)


@functools.partial(jax.jit, static_argnames=("config", "mesh", "rules"), donate_argnames=("state",))
def decode(config, params, state: DecodeState, settings, criteria, *, mesh=None, rules=DEFAULT_RULES) -> DecodeState:
    """Decodes until every row is done or the cache bucket is full, one `while_loop` step per token."""
    cache_len = state.tokens_bs.shape[1]

    def running(s: DecodeState):
        return jnp.any(~s.done_b) & (s.cache["end"] < cache_len)

    def step(s: DecodeState):
        slot = s.cache["end"]
        positions_b1 = (s.prompt_len_b + slot - s.prompt_width)[:, None]
        with moe.mesh_context(config, mesh, rules):
            logits_d1v, cache = forward(config, params, s.next_token_b[:, None], positions_b1, cache=s.cache)
        s = _record(s.replace(cache=cache), logits_d1v[:, 0], slot, settings, criteria)
        return _constrain(s, mesh, rules)

    return jax.lax.while_loop(running, step, _constrain(state, mesh, rules))


def _take_rows(state: DecodeState, keep_b) -> DecodeState:
    """The state of rows `keep_b` only, in that order (every field but the cache's `end` and `prompt_width`
    has the batch first)."""
    rows = functools.partial(jnp.take, indices=keep_b, axis=0)
    cache = _map_kv(state.cache, lambda x, length_axis: rows(x))
    per_row = {
        f.name: rows(getattr(state, f.name))
        for f in dataclasses.fields(state)
        if f.name not in ("cache", "prompt_width")
    }
    return state.replace(cache=dict(cache, valid_bs=rows(cache["valid_bs"])), **per_row)


@functools.partial(jax.jit, static_argnames=("cache_len", "mesh", "rules"))
def grow(state: DecodeState, keep_b=None, *, cache_len: int, mesh=None, rules=DEFAULT_RULES) -> DecodeState:
    """Copies the state into the next, larger cache bucket; with `keep_b` (int32 [B']), only those rows."""
    if keep_b is not None:
        state = _take_rows(state, keep_b)
    cache = _map_kv(state.cache, lambda x, length_axis: _pad_length(x, length_axis, cache_len))
    state = state.replace(
        cache=dict(cache, valid_bs=_pad_length(cache["valid_bs"], 1, cache_len, False)),
        tokens_bs=_pad_length(state.tokens_bs, 1, cache_len),
        logprobs_bs=_pad_length(state.logprobs_bs, 1, cache_len),
    )
    return _constrain(state, mesh, rules)
