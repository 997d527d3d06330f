"""Shaped rewards, one registered function each: (RewardBatch, **params) -> float32 [B].

Definitions follow Open-R1's `src/open_r1/rewards.py` and the papers cited per function.
Lengths are in tokens (Open-R1 uses characters for some of them; tokens are what the
sampler's budget is counted in, and what DAPO specifies).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from polaris_jax.rewards.extraction import THINK_CLOSE, THINK_OPEN, last_boxed
from polaris_jax.rewards.registry import register_reward


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """What shaped rewards see for B completions.

    completions: decoded completion texts (without the prompt).
    num_tokens_b: int [B] completion lengths in tokens.
    correct_b: float [B] verifier verdicts, 1.0 or 0.0 (from VerifierPool scores).
    group_ids_b: int [B] completions sampled for the same prompt share an id.
    """

    completions: Sequence[str]
    num_tokens_b: np.ndarray
    correct_b: np.ndarray
    group_ids_b: np.ndarray

    def __post_init__(self):
        size = len(self.completions)
        for name in ("num_tokens_b", "correct_b", "group_ids_b"):
            value = np.asarray(getattr(self, name))
            if value.shape != (size,):
                raise ValueError(f"{name} has shape {value.shape}, expected ({size},) for {size} completions")
            object.__setattr__(self, name, value)
        if np.any(self.num_tokens_b < 0):
            raise ValueError("num_tokens_b must be non-negative")

    @property
    def size(self) -> int:
        return len(self.completions)


@register_reward("accuracy")
def accuracy(batch: RewardBatch) -> np.ndarray:
    """r = 1 if the final answer verifies against the gold answer, else 0 (Open-R1
    `accuracy_reward`, with our extraction: last box, after `</think>`)."""
    return batch.correct_b.astype(np.float32)


@register_reward("format")
def format_reward(batch: RewardBatch, think_in_prompt: bool = False) -> np.ndarray:
    """r = 1 if the completion is `<think> … </think>` followed by a boxed final answer, else 0.

    Open-R1 `format_reward` matches `^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$`;
    R1-style math answers go in `\\boxed{}` instead of `<answer>` tags, so we require exactly
    one think block and a balanced box after it. With `think_in_prompt` the chat template
    already opened the block (`<think>\\n` forced), so the completion starts inside it.
    """
    rewards = np.zeros(batch.size, np.float32)
    for i, text in enumerate(batch.completions):
        opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
        if closes != 1 or opens != (0 if think_in_prompt else 1):
            continue
        thought, answer = text.split(THINK_CLOSE)
        if not think_in_prompt and not thought.lstrip().startswith(THINK_OPEN):
            continue
        if last_boxed(answer).answer:
            rewards[i] = 1.0
    return rewards


@register_reward("tag_count")
def tag_count(batch: RewardBatch, tags: Sequence[str] = (THINK_OPEN + "\n", "\n" + THINK_CLOSE + "\n")) -> np.ndarray:
    """r = (1/|T|) * sum_{t in T} [count(t) == 1]: partial credit per tag used exactly once.

    Open-R1 `tag_count_reward` gives 0.25 for each of `<think>\\n`, `\\n</think>\\n`,
    `\\n<answer>\\n`, `\\n</answer>`; the default here is the two think tags (0.5 each),
    and `tags` takes any list.
    """
    tags = tuple(tags)
    if not tags:
        raise ValueError("tag_count needs at least one tag")
    rewards = [sum(text.count(tag) == 1 for tag in tags) / len(tags) for text in batch.completions]
    return np.asarray(rewards, np.float32)


@register_reward("soft_overlong")
def soft_overlong(batch: RewardBatch, max_tokens: int, cache_tokens: int) -> np.ndarray:
    """DAPO overlong reward shaping (Yu et al. 2025, eq. 13), with L = completion tokens:

    R = 0                                   if L <= L_max - L_cache
    R = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
    R = -1                                  if L > L_max
    """
    if not 0 < cache_tokens <= max_tokens:
        raise ValueError(f"need 0 < cache_tokens <= max_tokens, got {cache_tokens} and {max_tokens}")
    length_b = batch.num_tokens_b.astype(np.float64)
    soft_start = max_tokens - cache_tokens
    ramp_b = (soft_start - length_b) / cache_tokens
    rewards = np.where(length_b <= soft_start, 0.0, np.where(length_b <= max_tokens, ramp_b, -1.0))
    return rewards.astype(np.float32)


@register_reward("cosine_length")
def cosine_length(
    batch: RewardBatch,
    max_tokens: int,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
) -> np.ndarray:
    """Cosine length scaling (Yeo et al. 2025, "Demystifying Long CoT"; Open-R1
    `get_cosine_scaled_reward`), with progress p = min(L / max_tokens, 1):

        correct: r = min_c + (max_c - min_c) * (1 + cos(pi p)) / 2    (short and right is best)
        wrong:   r = max_w + (min_w - max_w) * (1 + cos(pi p)) / 2    (short and wrong is worst)
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    progress_b = np.minimum(batch.num_tokens_b / max_tokens, 1.0)
    half_cos_b = 0.5 * (1.0 + np.cos(math.pi * progress_b))
    correct_reward_b = min_value_correct + (max_value_correct - min_value_correct) * half_cos_b
    wrong_reward_b = max_value_wrong + (min_value_wrong - max_value_wrong) * half_cos_b
    return np.where(batch.correct_b > 0.5, correct_reward_b, wrong_reward_b).astype(np.float32)


@register_reward("repetition")
def repetition(batch: RewardBatch, ngram_size: int = 3, max_penalty: float = -1.0) -> np.ndarray:
    """N-gram repetition penalty (Yeo et al. 2025, App. C.2; Open-R1
    `get_repetition_penalty_reward`) over lower-cased whitespace words:

        r = max_penalty * (1 - |unique n-grams| / |n-grams|),   0 if fewer than n words
    """
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be >= 1, got {ngram_size}")
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0, got {max_penalty}")
    rewards = np.zeros(batch.size, np.float32)
    for i, text in enumerate(batch.completions):
        words = text.lower().split()
        if len(words) < ngram_size:
            continue
        ngrams = list(zip(*(words[j:] for j in range(ngram_size))))
        rewards[i] = max_penalty * (1.0 - len(set(ngrams)) / len(ngrams))
    return rewards


@register_reward("kimi_length")
def kimi_length(batch: RewardBatch) -> np.ndarray:
    """Kimi k1.5 length penalty (Kimi Team 2025, sec. 2.3.3; Open-R1 `len_reward`), per group
    of completions for one prompt, with lambda = 0.5 - (L - min L) / (max L - min L):

        correct: r = lambda;   wrong: r = min(0, lambda);   all lengths equal: r = 0
    """
    rewards = np.zeros(batch.size, np.float32)
    for group in np.unique(batch.group_ids_b):
        members = np.flatnonzero(batch.group_ids_b == group)
        length_g = batch.num_tokens_b[members].astype(np.float64)
        shortest, longest = length_g.min(), length_g.max()
        if longest == shortest:
            continue
        lambda_g = 0.5 - (length_g - shortest) / (longest - shortest)
        correct_g = batch.correct_b[members] > 0.5
        rewards[members] = np.where(correct_g, lambda_g, np.minimum(0.0, lambda_g))
    return rewards
