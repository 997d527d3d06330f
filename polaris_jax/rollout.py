"""The one sample -> verify path: `sample_and_verify` turns problems into a typed, verified `Rollouts` batch.

GRPO rollouts, the in-loop evaluation, the eval job, the difficulty filter and the temperature search
all call it, with the same verifier pool and the same think policy (`resolve_think_policy`), so the
number trained on is the number reported.

    settings = RolloutSettings(max_response_len=4096, temperature=1.0, samples_per_prompt=8, prompt_width=512)
    verified = sample_and_verify(model_config, params, problems, settings, tokenizer=tok, pool=pool, seed=step)
    verified.rollouts.correct_b, verified.rollouts.rewards_b, verified.texts, verified.scores

The problems are sampled in `settings.chunks` pieces; the completions of piece i go to the verifier
pool (asynchronously) before piece i+1 is sampled, so verification overlaps sampling. The batch is
group-major (all samples of problem 0, then problem 1, ...) in fixed shapes: prompts left-padded to
the width T (`prompt_width`), responses right-padded to R = max_response_len, so an update never sees a new shape
within a stage. The sampler's padded arrays go into the batch as they are: no Python-list round trip.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import zlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from polaris_jax.data.problems import Problem
from polaris_jax.rewards.combine import combine_rewards
from polaris_jax.rewards.extraction import ExtractionConfig, resolve_think_policy
from polaris_jax.rewards.pool import VerifierPool
from polaris_jax.rewards.scoring import Score
from polaris_jax.rewards.shaped import RewardBatch
from polaris_jax.sampling import FINISH_EOS, FINISH_LENGTH, FINISH_REASONS, generate
from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.engine_settings import EngineSettings, engine_section, engine_settings_from
from polaris_jax.sampling.requests import Completion, Request, to_sample_output
from polaris_jax.sampling.sampler import SampleOutput

ACCURACY_ONLY = {"accuracy": {"weight": 1.0}}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollouts:
    """A verified rollout batch, one row per response (B rows), group-major.

    prompt_bt: int32 [B, T] prompt ids, left-padded with 0 to the width T.
    prompt_len_b: int32 [B] real prompt tokens.
    response_br: int32 [B, R] response ids (the EOS id included), right-padded with 0.
    response_len_b: int32 [B] real response tokens.
    sampler_logprobs_br: float32 [B, R] the sampler's log-probabilities of the response tokens.
    finish_b: int32 [B] why the row ended: `sampling.FINISH_EOS`, `FINISH_STOP` or `FINISH_LENGTH`.
    correct_b: float32 [B] the verifier's verdict (1.0 or 0.0).
    rewards_b: float32 [B] the weighted reward spec.
    group_b: int32 [B] the index of the row's problem in the caller's problem list.
    routed_experts_btlk: int16 [B, T + R, MoE layers, k] or None: the experts the engine routed each prompt and
      response position to (router replay; -1 on padding and the last response token).
    """

    prompt_bt: np.ndarray
    prompt_len_b: np.ndarray
    response_br: np.ndarray
    response_len_b: np.ndarray
    sampler_logprobs_br: np.ndarray
    finish_b: np.ndarray
    correct_b: np.ndarray
    rewards_b: np.ndarray
    group_b: np.ndarray
    routed_experts_btlk: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return int(self.response_len_b.shape[0])

    @property
    def truncated_b(self) -> np.ndarray:
        """bool [B]: the response hit max_response_len without an EOS id or stop sequence."""
        return self.finish_b == FINISH_LENGTH

    @property
    def finish_reasons(self) -> list[str]:
        """ "eos", "stop" or "length" per row."""
        return [FINISH_REASONS[int(code)] for code in self.finish_b]

    def replace(self, **fields) -> Rollouts:
        return dataclasses.replace(self, **fields)


@dataclasses.dataclass(frozen=True)
class Verified:
    """`sample_and_verify`'s result: the batch, the completion texts, the verifier's scores (with reasons and
    extracted answers) and host metrics ({time_rollout, time_reward, reward_failures, rollout_tokens,
    reward/NAME})."""

    rollouts: Rollouts
    texts: list[str]
    scores: list[Score]
    info: dict


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    max_response_len: int
    temperature: float
    samples_per_prompt: int
    prompt_width: int
    top_p: float = 1.0
    top_k: int = 0
    chunks: int = 1
    backend: str = "static"  # "static": `sampling.generate`; "engine": the continuous-batching engine
    engine: Mapping | None = None  # the engine's sizes, a `sampling.engine_settings.engine_section()` as a dict
    length_spread: float = 0.0  # benchmarks: > 0 ignores EOS and caps each prompt at `long_tail_budgets`
    seed: int = 0  # the long-tail budgets' seed
    router_replay: bool = False  # the engine records each token's experts (MoE)

    def engine_settings(self, model_config) -> EngineSettings | None:
        """The paged engine's settings for these rollouts, or None for the static `generate`."""
        max_seq_len = min(self.prompt_width + self.max_response_len, model_config.max_position_embeddings)
        if self.backend == "static":
            return None
        return engine_settings_from(self.engine or engine_section(), max_seq_len, self.router_replay)


def verifier_pool(think_policy: str, prompt_text: str, **pool_kwargs) -> VerifierPool:
    """The VerifierPool for completions of prompts like `prompt_text` (one rendered prompt), with the config's
    `verifier.think_policy` resolved for it (`rewards.extraction.resolve_think_policy`). Every caller of
    `sample_and_verify` builds its pool here, so training and evaluation score a completion alike."""
    think = resolve_think_policy(think_policy, prompt_text)
    return VerifierPool(extraction=ExtractionConfig(think=think), **pool_kwargs)


def long_tail_budgets(problems: Sequence[Problem], max_len: int, spread: float, seed: int) -> np.ndarray:
    """int32 [len(problems)] seeded per-problem response budgets for long-tail benchmarks: lognormal, with
    the 99th percentile `spread` times the 1st, the 99th at `max_len` (a function of the problem id only)."""
    z99 = 2.3263478740408408
    budgets = []
    for problem in problems:
        rng = np.random.default_rng([seed, zlib.crc32(problem.id.encode())])
        z = float(np.clip(rng.standard_normal(), -z99, z99))
        budgets.append(max(1, round(max_len * spread ** ((z - z99) / (2 * z99)))))
    return np.asarray(budgets, np.int32)


def rollout_seed(*parts: int) -> int:
    """A sampler seed that is a pure function of where we are in training, e.g. (seed, step, round)."""
    return int(np.random.SeedSequence([int(x) for x in parts]).generate_state(1)[0] % (2**31))


def prompt_width(problems: Sequence[Problem], multiple: int = 8) -> int:
    """The longest prompt, rounded up: the prompt width T of a batch of these problems."""
    return -(-max(len(p.prompt_ids) for p in problems) // multiple) * multiple


def _check_prompt_width(problems: Sequence[Problem], width: int) -> None:
    for problem in problems:
        if len(problem.prompt_ids) > width:
            raise ValueError(f"prompt {problem.id!r} has {len(problem.prompt_ids)} tokens, more than the width {width}")


def _left_padded(problems: Sequence[Problem], width: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    _check_prompt_width(problems, width)
    prompt_gt = np.zeros((len(problems), width), np.int32)
    for i, problem in enumerate(problems):
        prompt_gt[i, width - len(problem.prompt_ids) :] = problem.prompt_ids
    lengths_g = np.asarray([len(p.prompt_ids) for p in problems], np.int32)
    return np.repeat(prompt_gt, group_size, axis=0), np.repeat(lengths_g, group_size)


def completion_text(tokenizer, completion: Completion) -> str:
    """One engine completion decoded as `completion_texts` decodes a row."""
    tokens = completion.tokens[:-1] if completion.finish_reason == "eos" else completion.tokens
    return tokenizer.decode(list(tokens))


def completion_texts(tokenizer, response_br: np.ndarray, response_len_b: np.ndarray, finish_b: np.ndarray) -> list[str]:
    """The decoded responses, without the EOS id that ended a row (a stop sequence is kept)."""
    ends_b = response_len_b - (finish_b == FINISH_EOS)
    return [tokenizer.decode(response_br[i, : ends_b[i]].tolist()) for i in range(len(ends_b))]


def sample_and_verify(
    model_config,
    params,
    problems: Sequence[Problem],
    settings: RolloutSettings,
    *,
    tokenizer,
    pool,
    seed: int,
    reward_spec: Mapping = ACCURACY_ONLY,
    mesh=None,
    rules=None,
) -> Verified:
    """Samples `samples_per_prompt` responses per problem from `params`, verifies them in `pool` (whose
    extraction config carries the think policy) and shapes the rewards by `reward_spec`."""
    if not problems:
        raise ValueError("no problems to sample")
    _check_prompt_width(problems, settings.prompt_width)
    n = settings.samples_per_prompt
    eos_ids = tuple(tokenizer.eos_token_ids)
    per_chunk = -(-len(problems) // settings.chunks)
    kwargs = {} if mesh is None else {"mesh": mesh, "rules": rules}
    outputs, texts, futures = [], [], []
    time_rollout = 0.0
    engine_settings, engine_info = settings.engine_settings(model_config), collections.Counter()
    for c, start in enumerate(range(0, len(problems), per_chunk)):
        chunk = problems[start : start + per_chunk]
        started = time.perf_counter()
        sample = dict(
            max_new_tokens=settings.max_response_len,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            n=n,
            eos_token_ids=() if settings.length_spread else eos_ids,
            seed=rollout_seed(seed, c),
        )
        budgets = None
        if settings.length_spread:
            budgets = long_tail_budgets(chunk, settings.max_response_len, settings.length_spread, settings.seed)
        prompts = [list(q.prompt_ids) for q in chunk]
        if engine_settings is None:
            out = generate(model_config, params, prompts, **sample, **kwargs, max_new_tokens_per_prompt=budgets)
            chunk_texts = completion_texts(tokenizer, out.tokens_br, out.lengths_b, out.finish_b)
            futures.append(pool.score_async(chunk_texts, [q.answer for q in chunk for _ in range(n)]))
        else:  # each group goes to the verifier the moment its last sample ends
            score = lambda i, texts: pool.score_async(texts, [chunk[i].answer] * len(texts))  # noqa: E731
            out, chunk_texts, chunk_futures = _engine_sample(
                model_config, params, prompts, sample, engine_settings, engine_info, tokenizer, score, budgets, **kwargs
            )
            futures += chunk_futures
        time_rollout += time.perf_counter() - started
        outputs.append(out)
        texts += chunk_texts

    started = time.perf_counter()
    scores = [s for f in futures for s in f.result()]
    rollouts, reward_info = assemble_rollouts(
        problems, outputs, texts, scores, prompt_width=settings.prompt_width, n=n, reward_spec=reward_spec
    )
    info = {
        "time_rollout": time_rollout,
        "time_reward": time.perf_counter() - started,
        **reward_info,
        **_engine_metrics(engine_info),
    }
    return Verified(rollouts, texts, scores, info)


def assemble_rollouts(
    problems: Sequence[Problem],
    outputs: Sequence[SampleOutput],
    texts: Sequence[str],
    scores: Sequence[Score],
    *,
    prompt_width: int,
    n: int,
    reward_spec: Mapping = ACCURACY_ONLY,
) -> tuple[Rollouts, dict]:
    """The verified batch of n samples per problem from the sampler's padded outputs (row i·n + j is problem
    i's sample j, over `outputs` in order), their texts and scores; and {reward_failures, rollout_tokens,
    reward/NAME}. Rewards are shaped over the whole batch, as `reward_spec` asks."""
    prompt_bt, prompt_len_b = _left_padded(problems, prompt_width, n)
    response_len_b = np.concatenate([o.lengths_b for o in outputs]).astype(np.int32)
    correct_b = np.asarray([s.reward for s in scores], np.float32)
    group_b = np.repeat(np.arange(len(problems), dtype=np.int32), n)
    rewards_b, parts, failures = combine_rewards(
        RewardBatch(list(texts), response_len_b, correct_b, group_b), reward_spec
    )
    rollouts = Rollouts(
        prompt_bt=prompt_bt,
        prompt_len_b=prompt_len_b,
        response_br=np.concatenate([o.tokens_br for o in outputs]).astype(np.int32),
        response_len_b=response_len_b,
        sampler_logprobs_br=np.concatenate([o.logprobs_br for o in outputs]).astype(np.float32),
        finish_b=np.concatenate([o.finish_b for o in outputs]).astype(np.int32),
        correct_b=correct_b,
        rewards_b=rewards_b,
        group_b=group_b,
        routed_experts_btlk=_routed_experts(outputs, prompt_len_b, prompt_width),
    )
    info = {
        "reward_failures": float(failures),
        "rollout_tokens": float(response_len_b.sum()),
        **{f"reward/{name}": float(np.mean(v)) for name, v in parts.items()},
    }
    return rollouts, info


def _routed_experts(outputs: Sequence[SampleOutput], prompt_len_b, prompt_width: int) -> np.ndarray | None:
    """The engine's per-row records laid out as the update's rows: the prompt left-padded to `prompt_width`,
    then the response; -1 where nothing was recorded."""
    records = [r for o in outputs if o.routed_experts is not None for r in o.routed_experts]
    if not records:
        return None
    width = prompt_width + max(o.tokens_br.shape[1] for o in outputs)
    out = np.full((len(records), width, *records[0].shape[1:]), -1, np.int16)
    for b, (record, prompt_len) in enumerate(zip(records, prompt_len_b)):
        prompt_len = int(prompt_len)
        out[b, prompt_width - prompt_len : prompt_width] = record[:prompt_len]
        out[b, prompt_width : prompt_width + len(record) - prompt_len] = record[prompt_len:]
    return out


def _engine_sample(
    model_config, params, prompts, sample: dict, engine_settings, info, tokenizer, score, budgets, mesh=None, rules=None
):
    """One chunk through the paged engine: request i is prompt i with generate's seeds (sample_offset i·n),
    so both engines draw the same keys. `score(i, texts)` is called as request i finishes. Returns the padded
    outputs, the texts and the score futures (request order); the engine's per-step metrics go into `info`."""
    kwargs = {} if mesh is None else {"mesh": mesh, "rules": rules}
    engine = Engine(model_config, params, engine_settings, **kwargs)
    n = sample["n"]
    for i, prompt in enumerate(prompts):
        own = {} if budgets is None else {"max_new_tokens": int(budgets[i])}
        engine.submit(Request(prompt=prompt, sample_offset=i * n, id=i, **{**sample, **own}))
    completions, texts, futures = [None] * len(prompts), [None] * len(prompts), [None] * len(prompts)
    while engine.busy:
        engine.step()
        for i in [i for i in range(len(prompts)) if completions[i] is None and engine.finished(i)]:
            completions[i] = engine.pop_finished(i)
            texts[i] = [completion_text(tokenizer, c) for c in completions[i]]
            futures[i] = score(i, texts[i])
        m = engine.last_metrics
        info.update(steps=1, live_slots=m["live_slots"], pages_used=m["pages_used"], queue_length=m["queue_length"])
        info["max_pages_used"] = max(info["max_pages_used"], m["pages_used"])
    info.update(prefill_tokens=engine.totals["prefill_tokens"], decode_tokens=engine.totals["decode_tokens"])
    info.update(preemptions=engine.totals["preemptions"])
    info["pages"] = engine.pool.capacity
    out = to_sample_output(completions, sample["max_new_tokens"])
    return out, [t for per_request in texts for t in per_request], futures


def _engine_metrics(info) -> dict:
    """Per-step engine figures for the run's metrics: means over steps, totals and peaks."""
    steps = info.get("steps", 0)
    if not steps:
        return {}
    return {
        "engine/steps": float(steps),
        "engine/live_slots_mean": info["live_slots"] / steps,
        "engine/pages_used_mean": info["pages_used"] / steps,
        "engine/pages_used_max": float(info["max_pages_used"]),
        "engine/pages_total": float(info["pages"]),
        "engine/queue_length_mean": info["queue_length"] / steps,
        "engine/prefill_tokens": float(info["prefill_tokens"]),
        "engine/decode_tokens": float(info["decode_tokens"]),
        "engine/preemptions": float(info["preemptions"]),
    }
