"""The engine's device programs: pure jitted functions of (params, pages, batch) with fixed shapes.

- `prefill`: writes a flat chunk of C prompt tokens (from any number of sequences) into their pages.
  Token c is its own row of the model call, with its sequence's page table: it is written at its
  position, then attends to its sequence's positions up to its own, which the tokens before it in the
  chunk have just written. No logits are computed.
- `decode`: up to `block` tokens for every row of a slot bucket B. Each iteration feeds one token per row
  at its position, samples the next one with the row's own settings and key, and stops early once every
  row has met its budget or an EOS id. On CPU, a call whose rows are all greedy reduces the unembedding inside
  the packed-matmul kernel instead of writing [B, V] logits (`_next_tokens`).
- `copy`: the copy-on-write page copies of the forks made at admission.

Every shape is fixed per engine (C, the slot buckets, `block`, the page pool, the table width), and
params are an argument of each call, so new weights, prompts or settings never recompile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from polaris_jax.models import cpu_gemm, forward, moe
from polaris_jax.models.paged_attention import copy_pages
from polaris_jax.models.sharding import DEFAULT_RULES, logical_to_spec
from polaris_jax.models.transformer import lm_head
from polaris_jax.sampling.strategies import RowSettings, sample_rows

PAGE_AXES = ("kv_heads", None, None, None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    """One decode call's rows (B = a slot bucket; padding rows have budget 0 and write nothing).

    token_b: the token to feed (the last token of each row's context).
    position_b: its position.
    table_bp: each row's page table (NULL_PAGE padded).
    budget_b: tokens the row may generate in this call (its pages are reserved for them).
    seed_b, sample_b, num_new_b: the row's key is fold_in(fold_in(key(seed), sample), num_new + i).
    eos_ids_b: int32 [B, max_eos_ids] EOS ids, -1 padded.
    settings: RowSettings.
    adapter_b: int32 [B] adapter slots when the params hold a stack of adapters, else None.
    logprob_b: bool [B] whether the row wants its tokens' logprobs (None: every row does).
    """

    token_b: jax.Array
    position_b: jax.Array
    table_bp: jax.Array
    budget_b: jax.Array
    seed_b: jax.Array
    sample_b: jax.Array
    num_new_b: jax.Array
    eos_ids_b: jax.Array
    settings: RowSettings
    adapter_b: jax.Array | None = None  # multi-LoRA: each row's adapter slot
    logprob_b: jax.Array | None = None


def page_shardings(kv_pages: dict, mesh, rules) -> dict:
    """Each page array's NamedSharding on the mesh: kv heads over the axes the rules give `kv_heads`."""
    spec = lambda x: NamedSharding(mesh, logical_to_spec(PAGE_AXES, mesh, rules, x.shape))
    return jax.tree.map(spec, kv_pages)


def _constrain_pages(kv_pages: dict, mesh, rules) -> dict:
    if mesh is None:
        return kv_pages
    return jax.lax.with_sharding_constraint(kv_pages, page_shardings(kv_pages, mesh, rules))


def _run(config, params, kv_pages, token_b, position_b, table_bp, live_b, adapter_b, *, mesh, rules, record):
    """(final hidden states [B, 1, D], pages, experts_blk int32 [B, MoE layers, k] of each fed token when
    `record`)."""
    cache = dict(kv_pages, page_table_bp=table_bp)
    with moe.mesh_context(config, mesh, rules):
        out, cache, aux = forward(
            config,
            params,
            token_b[:, None],
            jnp.maximum(position_b, 0)[:, None],
            segment_ids_bt=live_b[:, None].astype(jnp.int32),
            cache=cache,
            return_hidden=True,
            return_aux=True,
            adapter_rows_b=adapter_b,
        )
    experts_blk = aux["routed_experts"][:, :, 0].swapaxes(0, 1) if record else None
    return out, dict(k=cache["k"], v=cache["v"]), experts_blk


@functools.partial(jax.jit, static_argnames=("config", "mesh", "rules", "record"), donate_argnames=("kv_pages",))
def prefill(
    config,
    params,
    kv_pages,
    token_c,
    position_c,
    table_cp,
    adapter_c=None,
    *,
    mesh=None,
    rules=DEFAULT_RULES,
    record=False,
):
    """Writes the chunk's tokens (position -1: padding) into their pages (adapter_c: each token's adapter slot
    under multi-LoRA); returns (pages, experts_clk: each token's experts [C, MoE layers, k] when `record`
    (router replay), else None)."""
    live_c = position_c >= 0
    _, kv_pages, experts_clk = _run(
        config,
        params,
        kv_pages,
        token_c,
        position_c,
        table_cp,
        live_c,
        adapter_c,
        mesh=mesh,
        rules=rules,
        record=record,
    )
    return _constrain_pages(kv_pages, mesh, rules), experts_clk


def _next_tokens(config, params, hidden_bd, keys_b, batch: DecodeBatch):
    """(tokens_b, logprobs_b) sampled from each row's logits. With a packed lm_head (CPU) and no adapter on it,
    a call whose rows are all greedy takes the fused kernel (`cpu_gemm.greedy_logprob`: argmax and logprob
    without writing the [B, V] logits, ~3.7x faster at 64 rows of a 152K vocabulary); the same tokens,
    logprobs equal up to float rounding. If no row wants logprobs either, the kernel finds the argmax alone
    (the logprobs are NaN)."""

    def sampled(h_bd):
        logits_bv = lm_head(config, params, h_bd[:, None], batch.adapter_b)[:, 0]
        return sample_rows(logits_bv, keys_b, batch.settings)

    head = params.get("lm_head")
    fusable = isinstance(head, cpu_gemm.PackedWeight) and hidden_bd.shape[0] <= cpu_gemm.MAX_KERNEL_ROWS
    if not fusable or "lm_head_lora_a" in params:
        return sampled(hidden_bd)
    all_greedy = jnp.all(batch.settings.temperature == 0.0)
    wanted = True if batch.logprob_b is None else jnp.any(batch.logprob_b)
    branch = jnp.where(all_greedy, jnp.where(wanted, 1, 2), 0)
    greedy = [lambda h_bd, logprob=logprob: cpu_gemm.greedy_logprob(h_bd, head, logprob) for logprob in (True, False)]
    return jax.lax.switch(branch, [sampled, *greedy], hidden_bd)


@functools.partial(
    jax.jit, static_argnames=("config", "block", "mesh", "rules", "record"), donate_argnames=("kv_pages",)
)
def decode(config, params, kv_pages, batch: DecodeBatch, *, block: int, mesh=None, rules=DEFAULT_RULES, record=False):
    """Returns (pages, tokens_br int32 [B, block], logprobs_br float32, steps, experts_brlk): row b's generated
    tokens are tokens_br[b, :min(budget_b, its first EOS + 1)]; `steps` is how many iterations ran;
    experts_brlk int32 [B, block, MoE layers, k] are the experts of the token fed at iteration r (the row's
    last token, then its new ones) when `record`, else None."""
    rows = batch.token_b.shape[0]
    row_key_b = jax.vmap(lambda seed, sample: jax.random.fold_in(jax.random.key(seed), sample))(
        batch.seed_b, batch.sample_b
    )

    def running(carry):
        i, _, _, done_b, _, _, _ = carry
        return (i < block) & ~jnp.all(done_b)

    def step(carry):
        i, kv_pages, token_b, done_b, tokens_br, logprobs_br, experts_brlk = carry
        live_b = ~done_b
        position_b = jnp.where(live_b, batch.position_b + i, -1)
        hidden_b1d, kv_pages, experts_blk = _run(
            config,
            params,
            kv_pages,
            token_b,
            position_b,
            batch.table_bp,
            live_b,
            batch.adapter_b,
            mesh=mesh,
            rules=rules,
            record=record,
        )
        if record:
            experts_brlk = experts_brlk.at[:, i].set(experts_blk)
        keys_b = jax.vmap(jax.random.fold_in)(row_key_b, batch.num_new_b + i)
        new_b, logprob_b = _next_tokens(config, params, hidden_b1d[:, 0], keys_b, batch)
        new_b = jnp.where(live_b, new_b, 0)
        tokens_br = tokens_br.at[:, i].set(new_b)
        logprobs_br = logprobs_br.at[:, i].set(jnp.where(live_b, logprob_b, 0.0))
        is_eos_b = jnp.any(new_b[:, None] == batch.eos_ids_b, axis=-1)
        done_b = done_b | (live_b & is_eos_b) | (i + 1 >= batch.budget_b)
        return i + 1, _constrain_pages(kv_pages, mesh, rules), new_b, done_b, tokens_br, logprobs_br, experts_brlk

    init = (
        jnp.zeros((), jnp.int32),
        kv_pages,
        batch.token_b,
        batch.budget_b <= 0,
        jnp.zeros((rows, block), jnp.int32),
        jnp.zeros((rows, block), jnp.float32),
        jnp.zeros((rows, block, config.num_layers_of("moe"), config.num_experts_per_tok), jnp.int32)
        if record
        else None,
    )
    steps, kv_pages, _, _, tokens_br, logprobs_br, experts_brlk = jax.lax.while_loop(running, step, init)
    return kv_pages, tokens_br, logprobs_br, steps, experts_brlk


@functools.partial(jax.jit, static_argnames=("mesh", "rules"), donate_argnames=("kv_pages",))
def copy(kv_pages, src_c, dst_c, *, mesh=None, rules=DEFAULT_RULES):
    """Copies page src_c[i] to dst_c[i] in every layer (dst NULL_PAGE: padding)."""
    pairs = [copy_pages(k, v, src_c, dst_c) for k, v in zip(kv_pages["k"], kv_pages["v"])]
    kv_pages = dict(k=tuple(k for k, _ in pairs), v=tuple(v for _, v in pairs))
    return _constrain_pages(kv_pages, mesh, rules)
