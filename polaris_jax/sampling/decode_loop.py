"""The jitted state machine: shared prefill, the per-bucket decode `while_loop`, and cache growth.

Three compiled functions, each keyed only by bucketed shapes (and the static config / settings):
  start(prefill batch, prompt bucket, decode batch, first cache bucket)
  decode(decode batch, cache bucket)
  grow(decode batch, cache bucket -> next bucket), optionally keeping only some rows (compaction)
Slot layout: prompts are left-padded to width P, so slot s of every row holds prompt token s - (P - len)
for s < P, and `tokens_dc[:, s]` holds the token *predicted* at slot s. Generated token g of a row is
thus at slot P - 1 + g, and is fed to the model at slot P + g.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from polaris_jax.models import forward, init_cache, lm_head
from polaris_jax.models.attention import HeadMajorKV
from polaris_jax.models.sharding import DEFAULT_RULES, logical_to_spec
from polaris_jax.sampling.strategies import SamplingSettings, sample

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
FINISH_REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopCriteria:
    """When a row finishes. Shapes are bucketed; -1 pads never match a token."""

    eos_e: jax.Array  # int32 [E] end-of-sequence ids
    stop_sl: jax.Array  # int32 [S, L] stop sequences, right-aligned, left-padded with -1 (wildcard)
    stop_len_s: jax.Array  # int32 [S] true lengths; 0 marks a padding row that never matches
    max_new_tokens: jax.Array  # int32 []


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: dict  # models.attention per-layer cache: k, v tuples of HeadMajorKV, valid_bs [D, C], end []
    next_token_d: jax.Array  # int32: sampled, not yet fed to the model
    tokens_dc: jax.Array  # int32: token predicted at each slot
    logprobs_dc: jax.Array  # float32: its log-probability (see strategies.sample)
    num_new_d: jax.Array  # int32: tokens generated so far
    done_d: jax.Array  # bool; dummy rows start done
    reason_d: jax.Array  # int32: RUNNING / EOS / STOP / LENGTH
    window_dl: jax.Array  # int32: the last L generated tokens, for stop sequences (-2 before any)
    prompt_len_d: jax.Array  # int32: real prompt tokens; positions continue from here
    row_key_d: jax.Array  # typed PRNG keys, one per row, folded from (seed, row id)
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
        next_token_d=("batch",),
        tokens_dc=("batch", "length"),
        logprobs_dc=("batch", "length"),
        num_new_d=("batch",),
        done_d=("batch",),
        reason_d=("batch",),
        window_dl=("batch", None),
        prompt_len_d=("batch",),
        row_key_d=("batch",),
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


def _stop_match_d(window_dl, criteria: StopCriteria):
    """[D] True where the last generated tokens end with one of the stop sequences."""
    length = criteria.stop_sl.shape[1]
    tail_dl = window_dl[:, window_dl.shape[1] - length :]
    hit_dsl = (tail_dl[:, None, :] == criteria.stop_sl[None]) | (criteria.stop_sl[None] == -1)
    return jnp.any(jnp.all(hit_dsl, axis=-1) & (criteria.stop_len_s[None] > 0), axis=-1)


def _record(state: DecodeState, logits_dv, slot, settings: SamplingSettings, criteria: StopCriteria):
    """Samples the next token of every running row from the logits at `slot` and updates who is done."""
    keys_d = jax.vmap(jax.random.fold_in)(state.row_key_d, state.num_new_d)
    token_d, logprob_d = sample(logits_dv, keys_d, settings)
    live_d = ~state.done_d
    token_d = jnp.where(live_d, token_d, 0)
    tokens_dc = jax.lax.dynamic_update_slice_in_dim(state.tokens_dc, token_d[:, None], slot, axis=1)
    logprobs_dc = jax.lax.dynamic_update_slice_in_dim(
        state.logprobs_dc, jnp.where(live_d, logprob_d, 0.0)[:, None], slot, axis=1
    )
    num_new_d = state.num_new_d + live_d.astype(jnp.int32)
    shifted_dl = jnp.concatenate([state.window_dl[:, 1:], token_d[:, None]], axis=1)
    window_dl = jnp.where(live_d[:, None], shifted_dl, state.window_dl)
    is_eos_d = jnp.any(token_d[:, None] == criteria.eos_e[None], axis=-1)
    is_stop_d = _stop_match_d(window_dl, criteria)
    is_length_d = num_new_d >= criteria.max_new_tokens
    reason_d = jnp.select(
        [~live_d, is_eos_d, is_stop_d, is_length_d],
        [
            state.reason_d,
            jnp.full_like(state.reason_d, EOS),
            jnp.full_like(state.reason_d, STOP),
            jnp.full_like(state.reason_d, LENGTH),
        ],
        state.reason_d,
    )
    return state.replace(
        next_token_d=jnp.where(live_d, token_d, state.next_token_d),
        tokens_dc=tokens_dc,
        logprobs_dc=logprobs_dc,
        num_new_d=num_new_d,
        done_d=state.done_d | (reason_d != RUNNING),
        reason_d=reason_d,
        window_dl=window_dl,
    )


def _pad_length(x, axis: int, size: int, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _prefill(config, params, prompt_bt, positions_bt, segment_bt, cache, chunk: int):
    """The prompt's forward pass into the cache; returns (last position's hidden [B, 1, D], cache).

    With 0 < chunk < P (and P a multiple of it) the prompt runs as P / chunk passes of `chunk` tokens
    under one `lax.scan`, each attending to the cache written so far, so activations are those of
    one chunk."""
    p = prompt_bt.shape[1]
    if not 0 < chunk < p or p % chunk:
        hidden_btd, cache = forward(
            config, params, prompt_bt, positions_bt, segment_ids_bt=segment_bt, cache=cache, return_hidden=True
        )
        return hidden_btd[:, -1:], cache
    chunks = lambda x: jnp.swapaxes(x.reshape(x.shape[0], p // chunk, chunk), 0, 1)

    def one_chunk(cache, xs):
        tokens_bc, positions_bc, segment_bc = xs
        hidden_bcd, cache = forward(
            config, params, tokens_bc, positions_bc, segment_ids_bt=segment_bc, cache=cache, return_hidden=True
        )
        return cache, hidden_bcd[:, -1:]

    cache, last_hidden = jax.lax.scan(one_chunk, cache, (chunks(prompt_bt), chunks(positions_bt), chunks(segment_bt)))
    return last_hidden[-1], cache


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "cache_dtype", "prefill_chunk", "mesh", "rules"))
def start(
    config,
    params,
    prompt_bt,
    prompt_len_b,
    row_src_d,
    row_id_d,
    row_live_d,
    seed,
    settings,
    criteria,
    *,
    cache_len: int,
    cache_dtype=None,
    prefill_chunk: int = 0,
    mesh=None,
    rules=DEFAULT_RULES,
) -> DecodeState:
    """Prefills each distinct prompt once, broadcasts its cache to its n rows, samples the first token.

    cache_dtype: the KV cache's dtype (None: the model's compute dtype).
    prefill_chunk: tokens per prefill pass (0: the whole prompt bucket at once; see `_prefill`)."""
    b, p = prompt_bt.shape
    segment_bt = (jnp.arange(p)[None, :] >= p - prompt_len_b[:, None]).astype(jnp.int32)
    positions_bt = jnp.maximum(jnp.cumsum(segment_bt, axis=1) - 1, 0).astype(jnp.int32)
    last_hidden_b1d, cache = _prefill(
        config,
        params,
        prompt_bt,
        positions_bt,
        segment_bt,
        init_cache(config, b, p, cache_dtype, per_layer=True),
        prefill_chunk,
    )
    last_logits_bv = lm_head(config, params, last_hidden_b1d)[:, 0]
    rows = functools.partial(jnp.take, indices=row_src_d, axis=0)
    cache = _map_kv(cache, lambda x, length_axis: _pad_length(rows(x), length_axis, cache_len))
    d = row_src_d.shape[0]
    window_len = criteria.stop_sl.shape[1]
    state = DecodeState(
        cache=dict(cache, valid_bs=_pad_length(rows(cache["valid_bs"]), 1, cache_len, False)),
        next_token_d=jnp.zeros((d,), jnp.int32),
        tokens_dc=jnp.zeros((d, cache_len), jnp.int32),
        logprobs_dc=jnp.zeros((d, cache_len), jnp.float32),
        num_new_d=jnp.zeros((d,), jnp.int32),
        done_d=~row_live_d,
        reason_d=jnp.zeros((d,), jnp.int32),
        window_dl=jnp.full((d, window_len), -2, jnp.int32),
        prompt_len_d=rows(prompt_len_b),
        prompt_width=jnp.asarray(p, jnp.int32),
        row_key_d=jax.vmap(functools.partial(jax.random.fold_in, jax.random.key(seed)))(row_id_d),
    )
    state = _record(_constrain(state, mesh, rules), rows(last_logits_bv), p - 1, settings, criteria)
    return _constrain(state, mesh, rules)


@functools.partial(jax.jit, static_argnames=("config", "mesh", "rules"), donate_argnames=("state",))
def decode(config, params, state: DecodeState, settings, criteria, *, mesh=None, rules=DEFAULT_RULES) -> DecodeState:
    """Decodes until every row is done or the cache bucket is full, one `while_loop` step per token."""
    cache_len = state.tokens_dc.shape[1]

    def running(s: DecodeState):
        return jnp.any(~s.done_d) & (s.cache["end"] < cache_len)

    def step(s: DecodeState):
        slot = s.cache["end"]
        positions_d1 = (s.prompt_len_d + slot - s.prompt_width)[:, None]
        logits_d1v, cache = forward(config, params, s.next_token_d[:, None], positions_d1, cache=s.cache)
        s = _record(s.replace(cache=cache), logits_d1v[:, 0], slot, settings, criteria)
        return _constrain(s, mesh, rules)

    return jax.lax.while_loop(running, step, _constrain(state, mesh, rules))


def _take_rows(state: DecodeState, keep_d) -> DecodeState:
    """The state of rows `keep_d` only, in that order (every field but the cache's `end` and `prompt_width`
    has the batch first)."""
    rows = functools.partial(jnp.take, indices=keep_d, axis=0)
    cache = _map_kv(state.cache, lambda x, length_axis: rows(x))
    per_row = {
        f.name: rows(getattr(state, f.name))
        for f in dataclasses.fields(state)
        if f.name not in ("cache", "prompt_width")
    }
    return state.replace(cache=dict(cache, valid_bs=rows(cache["valid_bs"])), **per_row)


@functools.partial(jax.jit, static_argnames=("cache_len", "mesh", "rules"))
def grow(state: DecodeState, keep_d=None, *, cache_len: int, mesh=None, rules=DEFAULT_RULES) -> DecodeState:
    """Copies the state into the next, larger cache bucket; with `keep_d` (int32 [D']), only those rows."""
    if keep_d is not None:
        state = _take_rows(state, keep_d)
    cache = _map_kv(state.cache, lambda x, length_axis: _pad_length(x, length_axis, cache_len))
    state = state.replace(
        cache=dict(cache, valid_bs=_pad_length(cache["valid_bs"], 1, cache_len, False)),
        tokens_dc=_pad_length(state.tokens_dc, 1, cache_len),
        logprobs_dc=_pad_length(state.logprobs_dc, 1, cache_len),
    )
    return _constrain(state, mesh, rules)
