"""Fixed-length training rows from tokenised examples (numpy, host side).

A row holds one or more examples ("segments") back to back, then padding:

  tokens_bt       input ids (pad id on padding)
  positions_bt    0, 1, 2, ... restarting at 0 for every segment (0 on padding)
  segment_ids_bt  1..k for the k segments of the row, 0 on padding
  targets_bt      the next token of the same segment (pad id where there is none)
  loss_mask_bt    1 where targets_bt[t] is a trained (assistant) token of the same segment

So the loss mask aligns with the targets: loss = sum(mask * xent(logits[t], targets[t])) / sum(mask).
The last token of a segment never predicts the first token of the next one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROW_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")


def make_row(segments: Sequence[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """segments: (tokens int[L], loss_mask int[L] on the tokens themselves), total L <= length."""
    total = sum(len(t) for t, _ in segments)
    if total > length:
        raise ValueError(f"segments hold {total} tokens, more than the row length {length}")
    tokens = np.full(length, pad_id, np.int32)
    positions = np.zeros(length, np.int32)
    segment_ids = np.zeros(length, np.int32)
    token_mask = np.zeros(length, np.int32)
    start = 0
    for k, (seg_tokens, seg_mask) in enumerate(segments, start=1):
        if len(seg_tokens) != len(seg_mask):
            raise ValueError(f"segment {k}: {len(seg_tokens)} tokens but {len(seg_mask)} mask entries")
        end = start + len(seg_tokens)
        tokens[start:end] = seg_tokens
        positions[start:end] = np.arange(len(seg_tokens))
        segment_ids[start:end] = k
        token_mask[start:end] = seg_mask
        start = end
    same_segment = np.zeros(length, bool)
    same_segment[:-1] = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[:-1] > 0)
    targets = np.where(same_segment, np.roll(tokens, -1), pad_id).astype(np.int32)
    loss_mask = np.where(same_segment, np.roll(token_mask, -1), 0).astype(np.int32)
    return {
        "tokens": tokens,
        "positions": positions,
        "segment_ids": segment_ids,
        "targets": targets,
        "loss_mask": loss_mask,
    }


def empty_row(length: int, pad_id: int) -> dict[str, np.ndarray]:
    return make_row((), length, pad_id)


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows -> a batch with `_bt` names."""
    return {f"{key}_bt": np.stack([row[key] for row in rows]) for key in ROW_KEYS}


def smallest_bucket(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {buckets[-1]}")
