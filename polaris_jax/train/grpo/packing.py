"""Packed GRPO updates (`algo.pack_tokens = L > 0`): (prompt + response) sequences packed into rows of L
tokens, so a batch of mostly short responses is not padded to the stage's longest.

The host packs each minibatch's sequences first-fit-decreasing into K rows of L tokens (segment ids
1, 2, ... per sequence, positions restarting at 0), K rounded up to 2^k or 1.5 x 2^k times the row
multiple (so a stage compiles for a few K only), and records for every response token where its
prediction sits in the packed rows: `flat_index_br[b, j] = row * L + column` of the position that
predicts response token j (-1 where there is none). The update runs the model on packed rows only; the
per-token log-probabilities and entropies are then gathered back to the [B, R] response layout, where
the policy loss, its aggregation mode, KL and the off-policy correction run unchanged. Microbatches are
slices of packed rows (a token budget of K / microbatches rows x L tokens), each response in exactly one,
so the microbatches' weighted losses sum to the minibatch's for every aggregation mode.

    packed = pack_update_batch(update_batch, row_tokens=L, minibatches=2, microbatches=2, row_multiple=1)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedUpdateBatch:
    """B responses in Mb minibatches; each minibatch's sequences packed into K rows of L tokens.

    tokens_mkl, positions_mkl, segment_ids_mkl: int32 [Mb, K, L] the packed model inputs.
    targets_mkl: int32 [Mb, K, L] the next token where it is a response token of the same sequence, else 0.
    flat_index_br: int32 [B, R] where response token j of row b is predicted: row * L + column within its
      minibatch's packed rows (row b belongs to minibatch b % Mb, as `losses.split_microbatches` splits);
      -1 past the response.
    mask_br, sampler_logprobs_br, advantages_b: as in `step.UpdateBatch`.
    routed_experts_mklk: int16 [Mb, K, L, MoE layers, k] or None: router replay's recorded experts, moved
      with their tokens (-1 = route, as on padding).
    """

    tokens_mkl: Any
    positions_mkl: Any
    segment_ids_mkl: Any
    targets_mkl: Any
    flat_index_br: Any
    mask_br: Any
    sampler_logprobs_br: Any
    advantages_b: Any
    routed_experts_mklk: Any = None


def _bins(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: lists of sequence indices whose lengths sum to <= row_tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k, room in enumerate(free) if room >= lengths[i]), None)
        if k is None:
            rows.append([])
            free.append(row_tokens)
            k = len(rows) - 1
        rows[k].append(i)
        free[k] -= lengths[i]
    return rows


def packed_rows(num_rows: int, multiple: int) -> int:
    """K >= num_rows: `multiple` times one of 1, 2, 3, 4, 6, 8, 12, 16, ... (2^k or 1.5 x 2^k), so a stage
    compiles for a few shapes only and wastes at most a third of the rows."""
    groups = -(-num_rows // multiple)
    return multiple * min(s for s in _SIZES if s >= groups)


_SIZES = sorted({2**k for k in range(48)} | {3 * 2**k for k in range(47)})


def pack_update_batch(batch, *, row_tokens: int, minibatches: int, microbatches: int, row_multiple: int = 1):
    """A `PackedUpdateBatch` from a host `step.UpdateBatch` (left-padded prompt, right-padded response)."""
    tokens_bt, segment_bt = np.asarray(batch.tokens_bt), np.asarray(batch.segment_ids_bt)
    response_br = np.asarray(batch.response_br)
    rows, r = response_br.shape
    p = tokens_bt.shape[1] - r
    prompt_len_b = segment_bt[:, :p].sum(axis=1)
    response_len_b = segment_bt[:, p:].sum(axis=1)
    lengths_b = prompt_len_b + response_len_b
    if lengths_b.max() > row_tokens:
        raise ValueError(f"a sequence of {int(lengths_b.max())} tokens does not fit algo.pack_tokens={row_tokens}")
    if rows % minibatches:
        raise ValueError(f"{rows} responses do not split into {minibatches} minibatches")
    per_minibatch = [list(range(m, rows, minibatches)) for m in range(minibatches)]
    bins = [_bins([int(lengths_b[b]) for b in members], row_tokens) for members in per_minibatch]
    k = packed_rows(max(len(x) for x in bins), microbatches * row_multiple)
    shape = (minibatches, k, row_tokens)
    tokens, positions, segments, targets = (np.zeros(shape, np.int32) for _ in range(4))
    flat_index_br = np.full((rows, r), -1, np.int32)
    routed_btlk = getattr(batch, "routed_experts_btlk", None)
    routed = None if routed_btlk is None else np.full(shape + routed_btlk.shape[2:], -1, routed_btlk.dtype)
    for m, (members, minibatch_bins) in enumerate(zip(per_minibatch, bins)):
        for row, sequence_ids in enumerate(minibatch_bins):
            offset = 0
            for segment, i in enumerate(sequence_ids, start=1):
                b = members[i]
                pl, rl = int(prompt_len_b[b]), int(response_len_b[b])
                sequence = np.concatenate([tokens_bt[b, p - pl : p], response_br[b, :rl]])
                span = slice(offset, offset + pl + rl)
                tokens[m, row, span] = sequence
                positions[m, row, span] = np.arange(pl + rl)
                segments[m, row, span] = segment
                predicts = offset + pl - 1 + np.arange(rl)  # the column whose logits give response token j
                targets[m, row, predicts] = response_br[b, :rl]
                flat_index_br[b, :rl] = row * row_tokens + predicts
                if routed is not None:
                    routed[m, row, span] = routed_btlk[b, p - pl : p + rl]
                offset += pl + rl
    return PackedUpdateBatch(
        tokens_mkl=tokens,
        positions_mkl=positions,
        segment_ids_mkl=segments,
        targets_mkl=targets,
        flat_index_br=flat_index_br,
        mask_br=np.asarray(batch.mask_br, np.float32),
        sampler_logprobs_br=np.asarray(batch.sampler_logprobs_br, np.float32),
        advantages_b=np.asarray(batch.advantages_b, np.float32),
        routed_experts_mklk=routed,
    )


def to_responses(values_kl, row_ids_k, flat_index_br, microbatches: int):
    """Per-token values of some packed rows (rows `row_ids_k` of the minibatch, taken m, m + M, ... by
    `split_microbatches`) gathered into the [B, R] response layout: (values_br, in_rows_br), 0 and False
    for response tokens these rows do not hold."""
    k, length = values_kl.shape
    row_br = flat_index_br // length
    micro = row_ids_k[0] % microbatches
    local_br = (row_br // microbatches) * length + flat_index_br % length
    in_rows_br = (flat_index_br >= 0) & (row_br % microbatches == micro)
    values_br = jnp.take(values_kl.reshape(-1), jnp.clip(local_br, 0, k * length - 1))
    return jnp.where(in_rows_br, values_br, 0.0), in_rows_br
