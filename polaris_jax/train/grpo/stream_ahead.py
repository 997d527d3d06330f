"""The asynchronous loop on the engine: `RolloutAhead`'s interface over `StreamingRollouts` (streaming.py).

    ahead = StreamingAhead(run, collect)
    ahead.start(first_step, total_steps, engine_params, version=first_step)
    for step in ...:
        collected, waited_s = ahead.take(step)      # the first prompts_per_step fresh groups, shaped
        update(...)
        ahead.after_update(step, total_steps, run.engine_params, version=step + 1)   # a push, no wait
    ahead.close()

One producer (and engine) per stage: a stage boundary changes the response budget and temperature, so
the old stage's groups in flight are abandoned with its engine. The batch then goes through the same
shaping as the synchronous loop (rescue, substitution, overlong filter, advantages); with
`shaping.dynamic_sampling`, zero-variance groups are already dropped on arrival. Stream positions are
admitted in order, so a resumed run continues after the last admitted prompt (prompts in flight at the
checkpoint are skipped, not repeated). On several processes each one runs its own engine replica over its
share of the stream, and each take gathers every process's groups (`replicas.py`).
"""

from __future__ import annotations

import jax
import numpy as np

from polaris_jax.rewards.combine import combine_rewards
from polaris_jax.rewards.shaped import RewardBatch
from polaris_jax.rollout import RolloutSettings, assemble_rollouts, long_tail_budgets, prompt_width, rollout_seed
from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.requests import Request, to_sample_output
from polaris_jax.train.grpo.config import stage_at
from polaris_jax.train.grpo.replicas import gather_groups, replica_position
from polaris_jax.train.grpo.streaming import Group, StreamingRollouts


class StreamingAhead:
    def __init__(self, run, collect):
        """`collect(step, params, version, sample=...)` is loop.collect bound to the run."""
        self.run, self.collect = run, collect
        self._producer, self._stage = None, None
        self._params, self._version, self._min_version = None, 0, 0

    def start(self, first_step: int, total_steps: int, params, version: int) -> None:
        del first_step, total_steps  # the first take builds the stage's producer
        self._params, self._version = params, version

    def _producer_for(self, stage, step: int) -> StreamingRollouts:
        """The stage's producer; a new one (for a new stage) starts at the learner's `step`."""
        if self._producer is not None and self._stage == stage.index:
            return self._producer
        if self._producer is not None:
            self._producer.close()
            self._params = self.run.engine_params()  # the learner's weights now, at self._version
        run, r = self.run, self.run.config.rollout
        stream = run.stream(stage)
        width = prompt_width(stream.problems)
        settings = RolloutSettings(
            max_response_len=stage.max_response_len,
            temperature=stage.temperature,
            samples_per_prompt=r.samples_per_prompt,
            prompt_width=width,
            backend="engine",
            engine=r.engine.to_dict(),
            router_replay=r.router_replay,
        )
        engine = Engine(
            run.model_config,
            self._params,
            settings.engine_settings(run.model_config),
            mesh=run.rollout_mesh,
            rules=run.rules,
            version=self._version,
        )
        self._params = None
        eos_ids = tuple(run.tokenizer.eos_token_ids)

        def request_for(group: Group) -> Request:
            budget = stage.max_response_len
            if r.length_spread:
                budget = int(long_tail_budgets([group.problem], budget, r.length_spread, run.config.seed)[0])
            return Request(
                prompt=list(group.problem.prompt_ids),
                max_new_tokens=budget,
                temperature=stage.temperature,
                top_p=r.top_p,
                top_k=r.top_k,
                n=r.samples_per_prompt,
                eos_token_ids=() if r.length_spread else eos_ids,
                seed=rollout_seed(run.config.seed, stage.index, group.position),
                id=group.position,
            )

        index, count = (jax.process_index(), jax.process_count()) if run.replicas else (0, 1)
        keep = None
        if run.config.shaping.dynamic_sampling:
            keep = lambda group: bool(_group_rewards(group, run.config.rewards).std() > 0)  # noqa: E731
        self._producer = StreamingRollouts(
            engine,
            problem_at=lambda position: stream.take(position, 1)[0],
            request_for=request_for,
            position=replica_position(run.host, index, count),
            first_step=step,
            groups_per_step=r.prompts_per_step // count,
            tokenizer=run.tokenizer,
            pool=run.pool,
            max_in_flight=r.max_prompts_in_flight // count,
            max_steps_per_response=r.max_steps_per_response,
            max_staleness=r.max_staleness,
            keep=keep,
            stride=count,
        )
        self._stage, self._width = stage.index, width
        return self._producer

    def take(self, step: int):
        stage = stage_at(self.run.stages, step)
        if self.run.host.stage != stage.index:
            self.run.host.start_stage(stage.index)
        producer = self._producer_for(stage, step)
        producer.resume()
        collected = self.collect(step, None, step, sample=lambda position, round_index: self._sample(step, stage))
        collected.version = self._min_version
        return collected, collected.time_s

    def _sample(self, step: int, stage):
        """`build_step_batch`'s sample(position, round): the next prompts_per_step fresh groups as a batch."""
        r, producer = self.run.config.rollout, self._producer
        host = self.run.host
        if self.run.replicas:  # this process's share, then every process's groups
            groups, counters = producer.take(step, r.prompts_per_step // jax.process_count())
            groups, counters, host.positions = gather_groups(groups, counters, producer.position)
            next_position = max(host.positions)
        else:
            groups, counters = producer.take(step, r.prompts_per_step)
            next_position = producer.position
        completions = [g.completions for g in groups]
        out = to_sample_output(completions, stage.max_response_len)
        problems = [g.problem for g in groups]
        texts = [t for g in groups for t in g.texts]
        scores = [s for g in groups for s in g.scores]
        rollouts, info = assemble_rollouts(
            problems,
            [out],
            texts,
            scores,
            prompt_width=self._width,
            n=r.samples_per_prompt,
            reward_spec=self.run.config.rewards,
        )
        versions = np.asarray([v for g in groups for v in g.versions])
        spans = [max(c.versions) - min(c.versions) for per in completions for c in per if c.versions]
        self._min_version = int(versions.min())
        info.update(time_rollout=counters.get("engine_s", 0.0), time_reward=0.0)
        info["rollout/staleness_mean"] = float(np.mean(step - versions))
        info["rollout/partial_fraction"] = float(np.mean(np.asarray(spans) > 0))
        for key in ("admitted", "carried", "dropped_stale", "dropped_uninformative", "pushes"):
            info[f"rollout/{key}"] = float(counters.get(key, 0))
        if self.run.replicas:
            info["rollout/replicas"] = float(counters["replicas"])
        # build_step_batch advances the position by prompts_per_step; the stream advanced by what was admitted.
        host.position = next_position - r.prompts_per_step
        return rollouts, problems, info

    def after_update(self, step: int, total_steps: int, params_fn, version: int) -> None:
        if self._producer is not None and step + 1 < total_steps:
            self._producer.push(params_fn(), version)
        self._version = version

    def drain(self) -> None:
        """Pauses decoding (the evaluation gets the cores and the verifier); the next take resumes it."""
        if self._producer is not None:
            self._producer.pause()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None


def _group_rewards(group: Group, reward_spec) -> np.ndarray:
    """The group's rewards under the run's spec, for the dynamic-sampling filter on arrival."""
    lengths = np.asarray([len(c.tokens) for c in group.completions], np.int32)
    correct = np.asarray([s.reward for s in group.scores], np.float32)
    rewards, _, _ = combine_rewards(RewardBatch(group.texts, lengths, correct, np.zeros_like(lengths)), reward_spec)
    return rewards
