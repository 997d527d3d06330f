"""Outcome-reward advantage estimators (one advantage per sampled response).

Convention: rewards come as `rewards_gn`, shape [num_groups, group_size], row g holding
the rewards of the `group_size` responses sampled for prompt g. The output has the same
shape. A flat batch laid out group by group (`[g0s0, g0s1, ..., g1s0, ...]`) converts with
`rewards_b.reshape(num_groups, group_size)`; `compute_advantages` does that for you and
returns the flat `advantages_b`.

An estimator's keyword arguments are its knobs (`algo.advantage_kwargs` in a GRPO config); its
`min_group_size` is declared where it is registered.

Standard deviations use Bessel's correction (ddof=1), as `torch.std` does in verl and TRL.
"""

from __future__ import annotations

import jax.numpy as jnp

from polaris_jax.train.rl.registry import ADVANTAGES, get_advantage, min_group_size, register_advantage


def _check_groups(rewards_gn, name: str):
    if rewards_gn.ndim != 2:
        raise ValueError(f"{name}: rewards must be [num_groups, group_size], got shape {rewards_gn.shape}")
    if rewards_gn.shape[1] < min_group_size(name):
        raise ValueError(
            f"{name}: needs at least {min_group_size(name)} samples per group, got group_size={rewards_gn.shape[1]}"
        )
    return jnp.asarray(rewards_gn, jnp.float32)


@register_advantage("grpo", min_group_size=2)
def grpo(rewards_gn, *, epsilon: float = 1e-6):
    """GRPO outcome supervision (DeepSeekMath, Shao et al. 2024, sec. 4.1.2):
    A_i = (r_i - mean(r)) / (std(r) + epsilon) within each group."""
    rewards_gn = _check_groups(rewards_gn, "grpo")
    mean_g1 = rewards_gn.mean(axis=1, keepdims=True)
    std_g1 = rewards_gn.std(axis=1, keepdims=True, ddof=1)
    return (rewards_gn - mean_g1) / (std_g1 + epsilon)


@register_advantage("dr_grpo")
def dr_grpo(rewards_gn):
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean(r).
    Dropping the std removes the bias toward too-easy and too-hard questions."""
    rewards_gn = _check_groups(rewards_gn, "dr_grpo")
    return rewards_gn - rewards_gn.mean(axis=1, keepdims=True)


@register_advantage("rloo", min_group_size=2)
def rloo(rewards_gn):
    """RLOO (Ahmadian et al. 2024): baseline is the mean of the other G-1 rewards,
    A_i = r_i - sum_{j != i} r_j / (G - 1) = G / (G - 1) * (r_i - mean(r))."""
    rewards_gn = _check_groups(rewards_gn, "rloo")
    group_size = rewards_gn.shape[1]
    loo_mean_gn = (rewards_gn.sum(axis=1, keepdims=True) - rewards_gn) / (group_size - 1)
    return rewards_gn - loo_mean_gn


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards_gn, *, epsilon: float = 1e-6):
    """REINFORCE++-baseline (Hu et al. 2025): subtract the group mean, then whiten the
    result over the whole batch (global mean and std), which keeps the scale stable
    across batches without the per-group std of GRPO."""
    rewards_gn = _check_groups(rewards_gn, "reinforce_pp_baseline")
    centred_gn = rewards_gn - rewards_gn.mean(axis=1, keepdims=True)
    return (centred_gn - centred_gn.mean()) / (centred_gn.std(ddof=1) + epsilon)


def compute_advantages(rewards_b, group_size: int, estimator: str = "grpo", **estimator_kwargs):
    """Flat rewards [num_groups * group_size] (group-major) -> flat advantages, same shape.
    `estimator_kwargs` are the estimator's own knobs (e.g. `epsilon` of `grpo`)."""
    if rewards_b.ndim != 1:
        raise ValueError(f"rewards must be flat [batch], got shape {rewards_b.shape}")
    if group_size < 1 or rewards_b.shape[0] % group_size:
        raise ValueError(f"batch of {rewards_b.shape[0]} rewards does not split into groups of {group_size}")
    kwargs = ADVANTAGES.bind(estimator, estimator_kwargs)
    rewards_gn = rewards_b.reshape(-1, group_size)
    return get_advantage(estimator)(rewards_gn, **kwargs).reshape(-1)
