"""A fixed random rollout batch shared by the RL loss tests (numpy, float64)."""

from __future__ import annotations

import numpy as np

NUM_GROUPS, GROUP_SIZE, T = 3, 4, 9


def make_batch(seed: int = 0, logprob_noise: float = 0.25) -> dict:
    rng = np.random.default_rng(seed)
    b = NUM_GROUPS * GROUP_SIZE
    lengths_b = rng.integers(2, T + 1, size=b)
    lengths_b[0] = T  # one full-length response
    mask_bt = (np.arange(T)[None, :] < lengths_b[:, None]).astype(np.float64)
    old_bt = -rng.uniform(0.05, 3.0, size=(b, T))
    new_bt = old_bt + rng.normal(0.0, logprob_noise, size=(b, T))
    ref_bt = old_bt + rng.normal(0.0, 0.2, size=(b, T))
    sampler_bt = old_bt + rng.normal(0.0, 0.3, size=(b, T))
    rewards_b = rng.integers(0, 2, size=b).astype(np.float64)
    rewards_b[:GROUP_SIZE] = [1.0, 0.0, 0.0, 1.0]  # at least one informative group
    return {
        "mask_bt": mask_bt,
        "old_logprobs_bt": old_bt,
        "logprobs_bt": new_bt,
        "ref_logprobs_bt": ref_bt,
        "sampler_logprobs_bt": sampler_bt,
        "rewards_b": rewards_b,
    }


def numpy_grpo_advantages(rewards_b: np.ndarray) -> np.ndarray:
    """DeepSeekMath sec. 4.1.2: A_i = (r_i - mean(r)) / std(r), std with Bessel's correction
    (torch.std, as verl and TRL use), epsilon 1e-6."""
    out = np.empty_like(rewards_b)
    for g in range(NUM_GROUPS):
        r = rewards_b[g * GROUP_SIZE : (g + 1) * GROUP_SIZE]
        mean = sum(r) / len(r)
        std = np.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
        out[g * GROUP_SIZE : (g + 1) * GROUP_SIZE] = [(x - mean) / (std + 1e-6) for x in r]
    return out
