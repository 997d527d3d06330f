"""Verifiable rewards: answer extraction, math equivalence, an isolated verifier pool and
shaped rewards selected by name.

    from polaris_jax.rewards import math_reward, VerifierPool
    math_reward("... so the answer is \\boxed{\\frac{1}{2}}", "0.5")   # 1.0
    with VerifierPool(num_workers=2, timeout_s=5) as pool:
        scores = pool.score_async(completions, golds).result()
"""

from polaris_jax.rewards.combine import combine_rewards, validate_spec
from polaris_jax.rewards.equivalence import Verdict, answers_equivalent, normalize_answer
from polaris_jax.rewards.extraction import Extraction, ExtractionConfig, extract_answer
from polaris_jax.rewards.pool import VerifierPool, default_pool, math_reward
from polaris_jax.rewards.registry import REWARDS, get_reward, register_reward, reward_names
from polaris_jax.rewards.scoring import Score, equivalent, score_completion
from polaris_jax.rewards.shaped import RewardBatch

__all__ = [
    "REWARDS",
    "Extraction",
    "ExtractionConfig",
    "RewardBatch",
    "Score",
    "Verdict",
    "VerifierPool",
    "answers_equivalent",
    "combine_rewards",
    "default_pool",
    "equivalent",
    "extract_answer",
    "get_reward",
    "math_reward",
    "normalize_answer",
    "register_reward",
    "reward_names",
    "score_completion",
    "validate_spec",
]
