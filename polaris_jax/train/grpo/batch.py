"""One step's training batch: rollouts, then batch shaping, then advantages (all on the host).

Order, as in DAPO / Polaris: rollout rescue (a stored correct answer into all-wrong groups), then
either DAPO dynamic sampling (more prompts until every group is informative) or Polaris in-batch
substitution (uninformative groups overwritten by informative ones, or the step skipped), then
overlong filtering of the loss mask, then group advantages on what is left. Step metrics about
the policy (accuracy, all-0 / all-1 groups, lengths, truncation, diversity) are measured on the
raw first-round rollouts, before any shaping changes the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from polaris_jax.rollout import Rollouts
from polaris_jax.train import rl

# What rollout rescue swaps into a group: every per-response field of `Rollouts`.
RESPONSE_FIELDS = ("response_br", "response_len_b", "sampler_logprobs_br", "finish_b", "correct_b", "rewards_b")

_DISTINCT_GROUPS = 8  # Distinct-4 is pure Python; measure it on a few groups per step


@dataclasses.dataclass
class StepBatch:
    rollouts: Rollouts  # the shaped batch; group_b indexes the step's problem pool
    advantages_b: np.ndarray
    mask_br: np.ndarray
    problem_ids: list[str]  # one per group
    skip: bool
    info: dict


def policy_metrics(rollouts: Rollouts, group_size: int, *, distinct: bool) -> dict:
    """What the sampled policy did: reward, accuracy, group fractions, lengths, truncation, diversity."""
    stats = rl.group_stats(rollouts.correct_b, group_size)
    lengths = rollouts.response_len_b
    out = {
        "reward_mean": float(np.mean(rollouts.rewards_b)),
        "accuracy": stats["accuracy"],
        "frac_all_correct_groups": stats["frac_all_correct_groups"],
        "frac_all_wrong_groups": stats["frac_all_wrong_groups"],
        "response_len_mean": float(np.mean(lengths)),
        "response_len_max": float(np.max(lengths)),
        "truncation_rate": float(np.mean(rollouts.truncated_b)),
    }
    if distinct:
        rows = min(len(lengths), _DISTINCT_GROUPS * group_size)
        responses = [rollouts.response_br[i, : lengths[i]].tolist() for i in range(rows)]
        out["distinct_4"] = rl.group_distinct_n(responses, group_size, 4)
    return out


def build_step_batch(
    *, sample: Callable[[int, int], tuple[Rollouts, list, dict]], config, step: int, host, group_size: int
) -> StepBatch:
    """`sample(position, round)` rolls out `prompts_per_step` prompts from the stream position and
    returns (rollouts, problems, info); `host` holds the stream position and the rescue buffer."""
    shaping, prompts = config.shaping, config.rollout.prompts_per_step
    batch, problems, info = sample(host.position, 0)
    host.position += prompts
    info = dict(info)
    info.update(policy_metrics(batch, group_size, distinct=config.train.log_distinct_4))
    ids = [p.id for p in problems]
    pool = list(problems)
    rng = np.random.default_rng([config.seed, step, 7])

    if host.rescue is not None:
        responses = {k: getattr(batch, k) for k in RESPONSE_FIELDS}
        rescued, rescue_info = host.rescue.rescue(responses, ids, rng)
        host.rescue.update(responses, ids)
        batch = batch.replace(**rescued)
        info.update({k: float(v) for k, v in rescue_info.items()})

    skip = False
    if shaping.dynamic_sampling:
        acc = rl.DynamicSamplingAccumulator(
            prompts, group_size, rewards_key="rewards_b", max_rounds=shaping.dynamic_sampling_max_rounds
        )
        acc.add(batch)
        round_index = 1
        while not acc.ready:
            more, more_problems, more_info = sample(host.position, round_index)
            host.position += prompts
            info["time_rollout"] += more_info["time_rollout"]
            info["time_reward"] += more_info["time_reward"]
            acc.add(more.replace(group_b=more.group_b + len(pool)))
            pool += more_problems
            round_index += 1
        batch, ds_info = acc.pop()
        info.update({k: float(v) for k, v in ds_info.items()})
    elif shaping.polaris_substitution:
        batch, sub_info = rl.polaris_substitute(
            batch, group_size, rng, rewards_key="rewards_b", min_informative_fraction=shaping.min_informative_fraction
        )
        skip = bool(sub_info["skip_step"])
        info["num_substituted_groups"] = float(sub_info["num_substituted_groups"])
        info["skipped_step"] = float(skip)

    ids = [pool[int(i)].id for i in batch.group_b[::group_size]]
    r = batch.response_br.shape[1]
    mask_br = (np.arange(r)[None, :] < batch.response_len_b[:, None]).astype(np.float32)
    if shaping.overlong_filter:
        mask_br = rl.overlong_filter_mask(mask_br, batch.truncated_b)
    advantages_b = np.asarray(
        rl.compute_advantages(
            jnp.asarray(batch.rewards_b, jnp.float32), group_size, config.algo.advantage, **config.algo.advantage_kwargs
        )
    )
    info["frac_informative_groups"] = float(np.mean(rl.informative_groups(batch.rewards_b, group_size)))
    return StepBatch(batch, advantages_b, mask_br, ids, skip, info)
