"""GRPO-family RL objective: advantage estimators, policy losses, aggregation, KL and
entropy regularisers, truncated importance sampling, batch shaping and diversity tools.

Everything pluggable is selected by name from a registry (see `registry.py`), with its own
knobs as keyword arguments:

    from polaris_jax.train import rl
    adv_b = rl.compute_advantages(rewards_b, group_size=8, estimator="grpo", epsilon=1e-6)
    loss, metrics = rl.rl_loss(logprobs_bt, old_logprobs_bt, adv_b, mask_bt, policy_loss="ppo_clip",
                               policy_loss_kwargs=dict(clip_low=0.2, clip_high=0.28))
"""

from polaris_jax.train.rl.advantages import (
    compute_advantages,
    dr_grpo,
    grpo,
    reinforce_pp_baseline,
    rloo,
)
from polaris_jax.train.rl.aggregation import aggregate_loss, masked_mean
from polaris_jax.train.rl.batch_shaping import (
    DynamicSamplingAccumulator,
    group_stats,
    informative_groups,
    overlong_filter_mask,
    polaris_substitute,
    select_groups,
)
from polaris_jax.train.rl.diversity import (
    distinct_4,
    distinct_n,
    group_distinct_n,
    search_temperature,
)
from polaris_jax.train.rl.importance import OFF_POLICY, OFF_POLICY_NAMES, apply_off_policy
from polaris_jax.train.rl.kl import kl_penalty
from polaris_jax.train.rl.loss import rl_loss
from polaris_jax.train.rl.policy_losses import cispo, gspo, ppo_clip
from polaris_jax.train.rl.registry import (
    ADVANTAGES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    get_advantage,
    get_kl_estimator,
    get_loss_aggregation,
    get_policy_loss,
    micro_weight,
    min_group_size,
    register_advantage,
    register_kl_estimator,
    register_loss_aggregation,
    register_policy_loss,
)
from polaris_jax.train.rl.rollout_rescue import RolloutRescueBuffer

__all__ = [
    "ADVANTAGES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "DynamicSamplingAccumulator",
    "RolloutRescueBuffer",
    "aggregate_loss",
    "apply_off_policy",
    "OFF_POLICY",
    "OFF_POLICY_NAMES",
    "cispo",
    "compute_advantages",
    "distinct_4",
    "distinct_n",
    "dr_grpo",
    "get_advantage",
    "get_kl_estimator",
    "get_loss_aggregation",
    "get_policy_loss",
    "group_distinct_n",
    "group_stats",
    "grpo",
    "gspo",
    "informative_groups",
    "kl_penalty",
    "masked_mean",
    "micro_weight",
    "min_group_size",
    "overlong_filter_mask",
    "polaris_substitute",
    "ppo_clip",
    "register_advantage",
    "register_kl_estimator",
    "register_loss_aggregation",
    "register_policy_loss",
    "reinforce_pp_baseline",
    "rl_loss",
    "rloo",
    "search_temperature",
    "select_groups",
]
