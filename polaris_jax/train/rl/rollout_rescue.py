"""Rollout rescue: give all-wrong groups one past correct answer (host-side, numpy).

Polaris's blog describes keeping, for each prompt, a correct response from an earlier
step and swapping it into that prompt's group when every new sample is wrong, so that
hard prompts still carry a learning signal. The Polaris release does not include this
code; this is our implementation of the description:

- the buffer keeps one correct response per prompt id, the most recent one seen;
- for a group whose samples are all wrong and whose prompt is in the buffer, one sample,
  chosen at random, is replaced by the stored response (all of its per-row entries,
  reward included), which makes the group informative.

The stored response comes from an older policy. Old log-probs are recomputed by the
trainer, so the PPO ratio stays correct; a TIS weight against the stored sampler log-probs
is then a (capped) correction for that staleness.

Rows of per-token entries ([rows, time, ...]) are right-padded: a stored row shorter than
the current batch is padded at the end with `pad_value` (0, i.e. masked); one longer than
the current batch cannot be rescued and is skipped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import numpy as np

from polaris_jax.train.rl.batch_shaping import Batch, batch_rows, group_rewards


def _fit_row(row: np.ndarray, like: np.ndarray, pad_value) -> np.ndarray | None:
    """Right-pads `row` to the per-row shape of `like`; None when it does not fit."""
    target = like.shape[1:]
    if row.shape == target:
        return row
    if row.ndim != len(target) or row.ndim == 0 or row.shape[1:] != target[1:]:
        return None
    if row.shape[0] > target[0]:
        return None
    pad = [(0, target[0] - row.shape[0])] + [(0, 0)] * (row.ndim - 1)
    return np.pad(row, pad, constant_values=pad_value)


class RolloutRescueBuffer:
    def __init__(
        self,
        group_size: int,
        *,
        rewards_key: str = "rewards",
        success_threshold: float = 0.5,
        max_prompts: int | None = None,
        pad_value=0,
    ):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.rewards_key = rewards_key
        self.success_threshold = success_threshold
        self.max_prompts = max_prompts
        self.pad_value = pad_value
        self._store: OrderedDict[Hashable, dict] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, prompt_id: Hashable) -> bool:
        return prompt_id in self._store

    def _correct_gn(self, batch: Batch, prompt_ids_g: Sequence[Hashable]) -> np.ndarray:
        rows = batch_rows(batch)
        if self.rewards_key not in batch:
            raise KeyError(f"rollout batch has no {self.rewards_key!r} entry: {sorted(batch)}")
        if len(prompt_ids_g) * self.group_size != rows:
            raise ValueError(f"{len(prompt_ids_g)} prompt ids x group_size {self.group_size} != {rows} rows")
        rewards_gn = group_rewards(batch[self.rewards_key], self.group_size)
        return rewards_gn >= self.success_threshold

    def update(self, batch: Batch, prompt_ids_g: Sequence[Hashable]) -> int:
        """Stores the first correct response of every group that has one; returns how many."""
        correct_gn = self._correct_gn(batch, prompt_ids_g)
        stored = 0
        for g, prompt_id in enumerate(prompt_ids_g):
            hits = np.flatnonzero(correct_gn[g])
            if hits.size == 0:
                continue
            row = g * self.group_size + hits[0]
            self._store[prompt_id] = {k: np.array(np.asarray(v)[row]) for k, v in batch.items()}
            self._store.move_to_end(prompt_id)
            stored += 1
        while self.max_prompts is not None and len(self._store) > self.max_prompts:
            self._store.popitem(last=False)
        return stored

    def rescue(self, batch: Batch, prompt_ids_g: Sequence[Hashable], rng: np.random.Generator) -> tuple[dict, dict]:
        """Swaps a stored correct response into each all-wrong group that has one.
        Returns the new batch and {'rescued_groups', 'rescue_skipped_too_long'}."""
        correct_gn = self._correct_gn(batch, prompt_ids_g)
        out = {k: np.array(v, copy=True) for k, v in batch.items()}
        rescued = skipped = 0
        for g, prompt_id in enumerate(prompt_ids_g):
            if correct_gn[g].any() or prompt_id not in self._store:
                continue
            stored = self._store[prompt_id]
            if set(stored) != set(out):
                raise ValueError(
                    f"stored response for prompt {prompt_id!r} has entries {sorted(stored)}, batch has {sorted(out)}"
                )
            fitted = {k: _fit_row(stored[k], out[k], self.pad_value) for k in out}
            if any(v is None for v in fitted.values()):
                skipped += 1
                continue
            row = g * self.group_size + int(rng.integers(self.group_size))
            for k, v in fitted.items():
                out[k][row] = v
            rescued += 1
        return out, {"rescued_groups": rescued, "rescue_skipped_too_long": skipped}
