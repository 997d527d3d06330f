"""Rollouts: n samples per prompt from the current params, scored by the verifier pool.

The prompts are sampled in `chunks` pieces; the completions of piece i go to the verifier pool
(asynchronously) before piece i+1 is sampled, so verification overlaps sampling. The result is a
host batch of numpy arrays, group-major (all samples of prompt 0, then prompt 1, ...), in fixed
shapes: prompts left-padded to the stage's prompt width P, responses right-padded to the stage's
max response length R, so the update never sees a new shape within a stage.

Batch entries ([B] = rows, one per response):
  prompt_bp int32 [B, P], prompt_len_b int32, response_br int32 [B, R] (EOS included), response_len_b int32,
  sampler_logprobs_br float32 [B, R], truncated_b bool (hit R without EOS), correct_b float32
  (verifier verdict), rewards float32 (the weighted reward spec), group_b int32 (prompt index).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from polaris_jax.sampling import generate
from polaris_jax.rewards.combine import combine_rewards
from polaris_jax.rewards.shaped import RewardBatch
from polaris_jax.data.problems import Problem

RESPONSE_KEYS = ("response_br", "response_len_b", "sampler_logprobs_br", "truncated_b", "correct_b", "rewards")


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    max_response_len: int
    temperature: float
    samples_per_prompt: int
    prompt_width: int
    top_p: float = 1.0
    top_k: int = 0
    chunks: int = 1


def rollout_seed(*parts: int) -> int:
    """A sampler seed that is a pure function of where we are in training, e.g. (seed, step, round)."""
    return int(np.random.SeedSequence([int(x) for x in parts]).generate_state(1)[0] % (2 ** 31))


def strip_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    tokens = list(tokens)
    return tokens[:-1] if tokens and tokens[-1] in eos_ids else tokens


def rollout(model_config, params, problems: Sequence[Problem], settings: RolloutSettings, *, tokenizer, pool,
            reward_spec, seed: int, mesh=None, rules=None) -> tuple[dict, list[str], dict]:
    """Samples, decodes and scores; returns (batch, completion texts, {time_rollout, time_reward, ...})."""
    g, r, p = settings.samples_per_prompt, settings.max_response_len, settings.prompt_width
    eos_ids = tuple(tokenizer.eos_token_ids)
    per_chunk = -(-len(problems) // settings.chunks)
    tokens, logprobs, reasons, texts, futures = [], [], [], [], []
    time_rollout = 0.0
    for c, start in enumerate(range(0, len(problems), per_chunk)):
        chunk = problems[start:start + per_chunk]
        started = time.perf_counter()
        kwargs = {} if mesh is None else {"mesh": mesh, "rules": rules}
        out = generate(model_config, params, [list(q.prompt_ids) for q in chunk], max_new_tokens=r,
                       temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, n=g,
                       eos_token_ids=eos_ids, seed=rollout_seed(seed, c), **kwargs)
        time_rollout += time.perf_counter() - started
        chunk_texts = [tokenizer.decode(strip_eos(t, eos_ids)) for t in out.tokens]
        futures.append(pool.score_async(chunk_texts, [q.answer for q in chunk for _ in range(g)]))
        tokens += out.tokens
        logprobs += out.logprobs
        reasons += out.finish_reasons
        texts += chunk_texts

    started = time.perf_counter()
    scores = [s for f in futures for s in f.result()]
    rows = len(tokens)
    batch = {
        "prompt_bp": np.zeros((rows, p), np.int32),
        "prompt_len_b": np.asarray([len(problems[i // g].prompt_ids) for i in range(rows)], np.int32),
        "response_br": np.zeros((rows, r), np.int32),
        "response_len_b": np.asarray([len(t) for t in tokens], np.int32),
        "sampler_logprobs_br": np.zeros((rows, r), np.float32),
        "truncated_b": np.asarray([reason == "length" for reason in reasons]),
        "correct_b": np.asarray([s.reward for s in scores], np.float32),
        "group_b": np.repeat(np.arange(len(problems), dtype=np.int32), g),
    }
    for i in range(rows):
        prompt = problems[i // g].prompt_ids
        if len(prompt) > p:
            raise ValueError(f"prompt {problems[i // g].id!r} has {len(prompt)} tokens, more than the width {p}")
        batch["prompt_bp"][i, p - len(prompt):] = prompt
        batch["response_br"][i, :len(tokens[i])] = tokens[i]
        batch["sampler_logprobs_br"][i, :len(tokens[i])] = logprobs[i]
    batch["rewards"], parts, failures = combine_rewards(
        RewardBatch(texts, batch["response_len_b"], batch["correct_b"], batch["group_b"]), reward_spec)
    info = {"time_rollout": time_rollout, "time_reward": time.perf_counter() - started,
            "reward_failures": float(failures),
            "rollout_tokens": float(batch["response_len_b"].sum()),
            **{f"reward/{name}": float(np.mean(v)) for name, v in parts.items()}}
    return batch, texts, info
