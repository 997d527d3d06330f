"""Host-side shaping of a rollout batch before advantages are computed (numpy).

A rollout batch is a pytree of numpy arrays sharing a leading axis of `num_groups * group_size`
rows, laid out group by group (all samples of prompt 0, then prompt 1, ...): a dict, or a
registered dataclass such as `polaris_jax.rollout.Rollouts`. Rewards are one of its entries or
fields (`rewards_key`, by default `"rewards"`). Every function returns new arrays; nothing is
modified in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

Batch = Any  # a pytree of [rows, ...] numpy arrays: a dict or a registered dataclass


def batch_rows(batch: Batch) -> int:
    paths = jax.tree_util.tree_flatten_with_path(batch)[0]
    sizes = {jax.tree_util.keystr(path): np.shape(value)[0] for path, value in paths}
    if not sizes:
        raise ValueError("empty rollout batch")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"rollout batch entries disagree on the number of rows: {sizes}")
    return next(iter(sizes.values()))


def batch_field(batch: Batch, key: str) -> np.ndarray:
    """`batch[key]` of a dict, `batch.key` of a dataclass; a KeyError names what the batch has."""
    if isinstance(batch, Mapping):
        if key not in batch:
            raise KeyError(f"rollout batch has no {key!r} entry: {sorted(batch)}")
        return batch[key]
    if not hasattr(batch, key):
        raise KeyError(f"rollout batch {type(batch).__name__} has no field {key!r}")
    return getattr(batch, key)


def group_rewards(rewards_b: np.ndarray, group_size: int) -> np.ndarray:
    """Flat group-major rewards [num_groups * group_size] -> [num_groups, group_size]."""
    rewards_b = np.asarray(rewards_b, dtype=np.float64)
    if rewards_b.ndim != 1:
        raise ValueError(f"rewards must be flat [batch], got shape {rewards_b.shape}")
    if group_size < 1 or rewards_b.shape[0] % group_size:
        raise ValueError(f"{rewards_b.shape[0]} rewards do not split into groups of {group_size}")
    return rewards_b.reshape(-1, group_size)


def informative_groups(rewards_b, group_size: int, *, atol: float = 1e-6) -> np.ndarray:
    """[num_groups] bool: the group's rewards are not all equal, so its advantages are nonzero."""
    rewards_gn = group_rewards(rewards_b, group_size)
    return (rewards_gn.max(axis=1) - rewards_gn.min(axis=1)) > atol


def group_stats(rewards_b, group_size: int, *, success_threshold: float = 0.5) -> dict:
    """Per-step group metrics. A sample counts as correct when reward >= success_threshold."""
    rewards_gn = group_rewards(rewards_b, group_size)
    correct_gn = rewards_gn >= success_threshold
    return {
        "reward_mean": float(rewards_gn.mean()),
        "accuracy": float(correct_gn.mean()),
        "frac_all_correct_groups": float(correct_gn.all(axis=1).mean()),
        "frac_all_wrong_groups": float((~correct_gn).all(axis=1).mean()),
        "frac_informative_groups": float(informative_groups(rewards_b, group_size).mean()),
    }


def group_row_indices(group_idx_k: np.ndarray, group_size: int) -> np.ndarray:
    """Group indices [k] -> their row indices [k * group_size], group-major."""
    group_idx_k = np.asarray(group_idx_k, dtype=np.int64)
    return (group_idx_k[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)


def select_groups(batch: Batch, group_idx_k, group_size: int) -> Batch:
    """The whole groups `group_idx_k`, in that order (repeats allowed)."""
    batch_rows(batch)
    rows = group_row_indices(group_idx_k, group_size)
    return jax.tree.map(lambda value: np.asarray(value)[rows], batch)


def concat_batches(batches) -> Batch:
    batches = list(batches)
    if not batches:
        raise ValueError("nothing to concatenate")
    structure = jax.tree.structure(batches[0])
    for other in batches[1:]:
        if jax.tree.structure(other) != structure:
            raise ValueError(f"batches have different entries: {structure} vs {jax.tree.structure(other)}")
    return jax.tree.map(lambda *values: np.concatenate([np.asarray(v) for v in values]), *batches)


class DynamicSamplingAccumulator:
    """DAPO dynamic sampling (Yu et al. 2025, sec. 3.2): keep only groups whose rewards are
    not all equal, and keep sampling more prompts until `target_groups` such groups exist.

        acc = DynamicSamplingAccumulator(target_groups=128, group_size=8, max_rounds=8)
        while not acc.ready:
            acc.add(rollout_and_score(next_prompts()))
        batch, stats = acc.pop()

    Surplus informative groups from the last round are dropped, as in DAPO: keeping them
    for the next step would train on samples from an older policy.
    """

    def __init__(
        self,
        target_groups: int,
        group_size: int,
        *,
        rewards_key: str = "rewards",
        max_rounds: int | None = None,
        atol: float = 1e-6,
    ):
        if target_groups < 1 or group_size < 1:
            raise ValueError(f"target_groups and group_size must be >= 1, got {target_groups}, {group_size}")
        self.target_groups = target_groups
        self.group_size = group_size
        self.rewards_key = rewards_key
        self.max_rounds = max_rounds
        self.atol = atol
        self._kept: list[Batch] = []
        self._num_kept = 0
        self.rounds = 0
        self.groups_seen = 0

    @property
    def ready(self) -> bool:
        return self._num_kept >= self.target_groups

    def add(self, batch: Batch) -> int:
        """Adds the informative groups of one rollout batch; returns how many were kept."""
        if self.max_rounds is not None and self.rounds >= self.max_rounds:
            raise RuntimeError(
                f"dynamic sampling: {self.rounds} rounds of rollouts gave only "
                f"{self._num_kept}/{self.target_groups} groups with distinct rewards; "
                "the data is too easy or too hard for the policy (filter it by difficulty) "
                "or max_rounds is too small"
            )
        rewards_b = batch_field(batch, self.rewards_key)
        rows = batch_rows(batch)
        keep_g = informative_groups(rewards_b, self.group_size, atol=self.atol)
        self.rounds += 1
        self.groups_seen += rows // self.group_size
        if keep_g.any():
            self._kept.append(select_groups(batch, np.flatnonzero(keep_g), self.group_size))
            self._num_kept += int(keep_g.sum())
        return int(keep_g.sum())

    def pop(self) -> tuple[Batch, dict]:
        """Exactly `target_groups` groups plus stats; resets the accumulator."""
        if not self.ready:
            raise RuntimeError(f"dynamic sampling: only {self._num_kept}/{self.target_groups} groups so far")
        rows = self.target_groups * self.group_size
        batch = jax.tree.map(lambda v: v[:rows], concat_batches(self._kept))
        stats = {
            "dynamic_sampling_rounds": self.rounds,
            "dynamic_sampling_groups_seen": self.groups_seen,
            "dynamic_sampling_kept_fraction": self._num_kept / max(self.groups_seen, 1),
        }
        self._kept, self._num_kept, self.rounds, self.groups_seen = [], 0, 0, 0
        return batch, stats


def polaris_substitute(
    batch: Batch,
    group_size: int,
    rng: np.random.Generator,
    *,
    rewards_key: str = "rewards",
    min_informative_fraction: float = 1.0 / 3.0,
    atol: float = 1e-6,
) -> tuple[Batch, dict]:
    """Polaris in-batch substitution (An et al. 2025, Polaris blog, "dynamic sampling").

    When more than `min_informative_fraction` of the groups are informative (rewards not all
    equal), every all-0 / all-1 group is overwritten with a copy of a randomly chosen
    informative group (without repetition while there are enough of them), so the batch
    keeps its size and shape without extra sampling. Otherwise the batch is returned
    unchanged with `skip_step=True`: the caller should not update on it.
    """
    rows = batch_rows(batch)
    keep_g = informative_groups(batch_field(batch, rewards_key), group_size, atol=atol)
    num_groups = rows // group_size
    good_g, bad_g = np.flatnonzero(keep_g), np.flatnonzero(~keep_g)
    info = {
        "skip_step": False,
        "num_substituted_groups": 0,
        "frac_informative_groups": len(good_g) / num_groups,
    }
    if len(good_g) / num_groups <= min_informative_fraction:
        info["skip_step"] = True
        return batch, info
    if len(bad_g) == 0:
        return batch, info
    donors = rng.choice(good_g, size=len(bad_g), replace=len(good_g) < len(bad_g))
    source_g = np.arange(num_groups)
    source_g[bad_g] = donors
    info["num_substituted_groups"] = int(len(bad_g))
    return select_groups(batch, source_g, group_size), info


def overlong_filter_mask(mask_bt: np.ndarray, truncated_b: np.ndarray) -> np.ndarray:
    """DAPO overlong filtering (sec. 3.4): truncated responses get an all-zero loss mask, so
    a cut-off answer is neither rewarded nor punished for its length."""
    mask_bt = np.asarray(mask_bt)
    truncated_b = np.asarray(truncated_b, dtype=bool)
    if truncated_b.shape != mask_bt.shape[:1]:
        raise ValueError(f"truncated flags {truncated_b.shape} do not match mask rows {mask_bt.shape}")
    return np.where(truncated_b[:, None], np.zeros_like(mask_bt), mask_bt)
