"""The GRPO training loop: `run(config, workdir) -> final metrics`, the `grpo` job of polaris_jax.main.

    python -m polaris_jax.main --config=configs/polaris_qwen3_4b.py --workdir=/ckpt/polaris_4b

Each step: prompts -> rollouts (current params, verified in the pool while the next chunk samples)
-> batch shaping and advantages -> the jitted update (mu passes over minibatches) -> metrics,
checkpoint, held-out evaluation every k steps. The stage schedule changes the response length,
temperature and dataset at stage boundaries (one compile per stage).

Workdir: config.json, checkpoints/<step>/ (orbax: train state + host state), metrics.jsonl and
TensorBoard events, evals.jsonl, export/hf/ (and curves.png when `polaris_jax.main` runs it with
config.plots). Rerunning the same command resumes
exactly from the latest checkpoint. A non-finite loss stops the run with the step, update and
prompts named, the offending batch saved, and the last good checkpoint untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import numpy as np

from polaris_jax.data import problems as problems_lib
from polaris_jax.data import synthetic_arith
from polaris_jax.data.tokenizer import Tokenizer
from polaris_jax.distributed import wait_for_process_zero
from polaris_jax.models.sharding import sharding_rules
from polaris_jax.rollout import RolloutSettings, prompt_width, rollout_seed, sample_and_verify, verifier_pool
from polaris_jax.sampling.sampler import batch_shards
from polaris_jax.train import checkpoint as checkpoint_lib
from polaris_jax.train import metrics as metrics_lib
from polaris_jax.train import partitioning, setup
from polaris_jax.train import state as state_lib
from polaris_jax.train.grpo import batch as grpo_batch
from polaris_jax.train.grpo import evaluate as grpo_eval
from polaris_jax.train.grpo import step as grpo_step
from polaris_jax.train.grpo.config import stage_at, stages, total_steps, validate_config
from polaris_jax.train.grpo.host_state import HostState, PersistentRescueBuffer
from polaris_jax.train.grpo.packing import pack_update_batch
from polaris_jax.train.grpo.replicas import ReplicaParamsMover
from polaris_jax.train.grpo.rollout_ahead import RolloutAhead
from polaris_jax.train.grpo.rollout_mesh import ParamsMover, engine_replicas, meshes
from polaris_jax.train.grpo.stream_ahead import StreamingAhead
from polaris_jax.train.optimizer import optimizer_from_config

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Collected:
    """A step's shaped batch, the weight version that sampled it, and the host state right after it."""

    step_batch: grpo_batch.StepBatch
    stage: object
    version: int
    host: HostState
    time_s: float


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient of an update was not finite; the run stops with the last good checkpoint."""


class Run:
    """Everything built once per run: model, state, pool, checkpointer, per-stage data and update fns."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.rules = sharding_rules(config)
        self.mesh, self.rollout_mesh = meshes(config)  # training; the engine's (the same unless rollout.mesh)
        self.tokenizer_dir = config.tokenizer_dir or config.model.init_from
        if not self.tokenizer_dir:
            raise ValueError("no tokenizer: set tokenizer_dir or model.init_from")
        if self.tokenizer_dir == "synthetic_arith":
            self.tokenizer_dir = os.path.join(workdir, "data", "tokenizer")
            if jax.process_index() == 0:
                synthetic_arith.build_tokenizer(self.tokenizer_dir)
            wait_for_process_zero("synthetic tokenizer")
        self.tokenizer = Tokenizer.from_dir(self.tokenizer_dir)
        rng = jax.random.PRNGKey(config.seed)
        model_rng, state_rng = jax.random.split(rng)
        base = setup.model_config_from(config, self.tokenizer)
        self.model_config, params, mask = setup.build_params(config, base, self.mesh, self.rules, model_rng)
        self.stages = stages(config)
        updates_per_step = config.algo.num_iterations * config.algo.minibatches
        self.optimizer, self.schedule = optimizer_from_config(
            config.optimizer, total_steps(config) * updates_per_step, config.model.param_dtype
        )
        self.shardings = partitioning.state_shardings(self.model_config, self.optimizer, mask, self.mesh, self.rules)
        # The reference is a real copy: the policy's buffers are donated to every update.
        self.ref_params = (
            jax.jit(lambda p: jax.tree.map(lambda x: x.copy(), p))(params) if config.algo.use_reference else None
        )
        self.state = partitioning.init_sharded_state(params, self.optimizer, state_rng, mask, self.shardings)
        self.replicas = engine_replicas(config)  # an engine per process (several processes, streaming)
        self.to_engine = None
        if self.rollout_mesh is not self.mesh:
            mover = ReplicaParamsMover if self.replicas else ParamsMover
            self.to_engine = mover(self.model_config, self.rollout_mesh, self.rules, trainable_mask=mask)
        del params
        rescue = (
            PersistentRescueBuffer(
                config.rollout.samples_per_prompt,
                rewards_key="correct_b",
                max_prompts=config.shaping.rescue_max_prompts,
            )
            if config.shaping.rollout_rescue
            else None
        )
        self.host = HostState(rescue)
        c = config.checkpoint
        self.ckpt = checkpoint_lib.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            every=c.every,
            keep=c.keep,
            async_save=c.async_save,
            lora_only=c.lora_only,
        )
        # One pool, so one think policy, for rewards and evaluation.
        self.pool = verifier_pool(
            config.verifier.think_policy,
            problems_lib.prompt_text("1+1", self.tokenizer, config.data),
            num_workers=config.reward_workers or None,
            timeout_s=config.reward_timeout_s,
        )
        self._streams: dict[int, problems_lib.ProblemStream] = {}
        self._updates: dict[int, tuple] = {}

    def stream(self, stage) -> problems_lib.ProblemStream:
        if stage.index not in self._streams:
            problems = problems_lib.load_problems(stage.dataset, self.tokenizer, self.config.data)
            self._streams[stage.index] = problems_lib.ProblemStream(
                problems, seed=self.config.seed, stage=stage.index, shuffle=self.config.data.shuffle
            )
        return self._streams[stage.index]

    def update_fn(self, stage):
        if stage.index not in self._updates:
            rows = self.config.rollout.prompts_per_step * self.config.rollout.samples_per_prompt
            settings = grpo_step.update_settings(self.config, stage)
            fn = grpo_step.make_grpo_update(
                self.model_config,
                self.optimizer,
                self.schedule,
                settings,
                mesh=self.mesh,
                state_shardings=self.shardings,
                rules=self.rules,
                rows=rows,
            )
            packed = bool(self.config.algo.pack_tokens)
            shardings = grpo_step.batch_shardings(self.mesh, self.rules, rows, packed, settings.router_replay)
            self._updates[stage.index] = (fn, shardings)
        return self._updates[stage.index]

    def params(self):
        return state_lib.full_params(self.state)

    def place_optimizer(self, memory_kind: str) -> None:
        """With optimizer.offload_during_rollout, moves the optimiser state to "pinned_host" (while the engine
        decodes, its HBM goes to the KV pages) or back to "device" (for the update); else does nothing."""
        if self.config.optimizer.offload_during_rollout:
            shardings = partitioning.in_memory(self.shardings["opt_state"], memory_kind)
            self.state = {**self.state, "opt_state": jax.device_put(self.state["opt_state"], shardings)}

    def sampler_params(self):
        """(params, mesh) for this run's sampler: the engine's mesh (one resharding transfer) or the training mesh
        (also with engine replicas: the evaluation steps every process through one schedule)."""
        if self.config.rollout.backend == "engine" and self.to_engine is not None and not self.replicas:
            return self.to_engine(self.params()), self.rollout_mesh
        return self.params(), self.mesh

    def engine_params(self):
        """A fresh copy of the params on the engine's mesh (the update donates the learner's buffers)."""
        return _copy_params(self.params()) if self.to_engine is None else self.to_engine(self.params())

    def close(self) -> None:
        self.ckpt.close()
        self.pool.close()


def _sampler(run: Run, stage, step: int, params, mesh):
    r = run.config.rollout
    stream = run.stream(stage)
    settings = RolloutSettings(
        max_response_len=stage.max_response_len,
        temperature=stage.temperature,
        samples_per_prompt=r.samples_per_prompt,
        prompt_width=prompt_width(stream.problems),
        top_p=r.top_p,
        top_k=r.top_k,
        chunks=r.chunks,
        backend=r.backend,
        engine=r.engine.to_dict(),
        length_spread=r.length_spread,
        seed=run.config.seed,
        router_replay=r.router_replay,
    )

    def sample(position: int, round_index: int):
        problems = stream.take(position, r.prompts_per_step)
        verified = sample_and_verify(
            run.model_config,
            params,
            problems,
            settings,
            tokenizer=run.tokenizer,
            pool=run.pool,
            reward_spec=run.config.rewards,
            seed=rollout_seed(run.config.seed, step, round_index),
            mesh=mesh,
            rules=run.rules,
        )
        return verified.rollouts, problems, verified.info

    return sample


def _evaluate(run: Run, problems, step: int) -> dict:
    e = run.config.eval
    temperature = e.temperature if e.temperature >= 0 else run.stages[0].temperature
    params, mesh = run.sampler_params()
    result = grpo_eval.evaluate(
        run.model_config,
        params,
        problems,
        tokenizer=run.tokenizer,
        pool=run.pool,
        samples_per_problem=e.samples_per_problem,
        temperature=temperature,
        max_response_len=e.max_response_len or run.stages[-1].max_response_len,
        seed=rollout_seed(run.config.seed, 99991),
        mesh=mesh,
        rules=run.rules,
        top_p=run.config.rollout.top_p,
        backend=run.config.rollout.backend,
        engine=run.config.rollout.engine.to_dict(),
    )
    result["step"] = step
    if jax.process_index() == 0:
        with open(os.path.join(run.workdir, "evals.jsonl"), "a") as f:
            f.write(json.dumps(result) + "\n")
    logger.info("eval at step %d: pass@1 %.4f; example: %r", step, result["pass@1"], result["example"][:200])
    return result


def _stop_on_nonfinite(run: Run, step: int, step_batch, update_batch: dict, metrics: dict) -> None:
    first = int(metrics["first_nonfinite_update"])
    minibatches = run.config.algo.minibatches
    path = os.path.join(run.workdir, f"nonfinite_batch_step{step}.npz")
    np.savez(path, **vars(update_batch))
    run.ckpt.wait()
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {step}, update {first} (iteration {first // minibatches}, "
        f"minibatch {first % minibatches}) of {int(metrics['nonfinite_updates'])} bad updates; prompts "
        f"{step_batch.problem_ids[:8]}{'...' if len(step_batch.problem_ids) > 8 else ''}; batch saved to {path}; "
        f"the last good checkpoint is step {run.ckpt.latest_step()} in {run.ckpt.directory}"
    )


def collect(run: Run, step: int, params, version: int, *, mesh=None, sample=None) -> Collected:
    """The step's rollouts, shaped into a batch, sampled with `params` on `mesh` (default: the training mesh;
    the weights after `version` updates), or drawn from `sample(position, round)` when given. Advances the
    host state (prompt stream, rescue buffer) and freezes it with the batch."""
    stage = stage_at(run.stages, step)
    if run.host.stage != stage.index:
        run.host.start_stage(stage.index)
    started = time.perf_counter()
    step_batch = grpo_batch.build_step_batch(
        sample=sample or _sampler(run, stage, step, params, run.mesh if mesh is None else mesh),
        config=run.config,
        step=step,
        host=run.host,
        group_size=run.config.rollout.samples_per_prompt,
    )
    return Collected(step_batch, stage, version, run.host.snapshot(), time.perf_counter() - started)


def update(run: Run, step: int, collected: Collected, waited_s: float = 0.0) -> dict:
    """The jitted update on a collected batch; returns the step's host metrics. `step` is 0-based."""
    config, stage, step_batch = run.config, collected.stage, collected.step_batch
    started = time.perf_counter()
    run.place_optimizer("device")  # the update, and any checkpoint after it, see it on the device
    metrics = dict(step_batch.info)
    metrics.update(stage=float(stage.index), temperature=stage.temperature)
    metrics["rollout/staleness"] = float(step - collected.version)
    time_update = 0.0
    if not step_batch.skip:
        update_fn, batch_shardings = run.update_fn(stage)
        host_batch = grpo_step.update_batch(step_batch.rollouts, step_batch.advantages_b, step_batch.mask_br)
        train_tokens = float(host_batch.segment_ids_bt.sum()) * (1 + config.algo.num_iterations)
        if config.algo.pack_tokens:
            settings = grpo_step.update_settings(config, stage)
            host_batch = pack_update_batch(
                host_batch,
                row_tokens=settings.pack_tokens,
                minibatches=settings.minibatches,
                microbatches=settings.packed_row_multiple,
                row_multiple=batch_shards(run.mesh, run.rules),
            )
            metrics["packed_rows"] = float(host_batch.tokens_mkl.shape[0] * host_batch.tokens_mkl.shape[1])
        device_batch = grpo_step.put_update_batch(host_batch, batch_shardings)
        t0 = time.perf_counter()
        run.state, update_metrics = update_fn(
            run.state, device_batch, jax.random.fold_in(run.state["rng"], step), run.ref_params
        )
        update_metrics = {k: float(v) for k, v in jax.device_get(update_metrics).items()}
        time_update = time.perf_counter() - t0
        if update_metrics["nonfinite_updates"] > 0:
            _stop_on_nonfinite(run, step + 1, step_batch, host_batch, update_metrics)
        metrics.update(update_metrics)
        metrics["train_tokens_per_s"] = train_tokens / max(time_update, 1e-9)
    metrics["time_update"] = time_update
    if run.to_engine is not None:  # the latest push of weights to the engine's mesh
        metrics.update(run.to_engine.last)
    metrics["rollout_tokens_per_s"] = metrics.pop("rollout_tokens") / max(metrics["time_rollout"], 1e-9)
    metrics["time_wait_rollout"] = waited_s
    metrics["time_step"] = time.perf_counter() - started + waited_s
    metrics["rollout/wait_fraction"] = waited_s / max(metrics["time_step"], 1e-9)
    return metrics


def train_step(run: Run, step: int) -> dict:
    """Synchronous: rollout with the current params, shape, update. `step` is 0-based."""
    started = time.perf_counter()
    run.place_optimizer("pinned_host")
    params, mesh = run.sampler_params()
    collected = collect(run, step, params, step, mesh=mesh)
    return update(run, step, collected, waited_s=time.perf_counter() - started)


def _before_accuracy(workdir: str) -> float | None:
    path = os.path.join(workdir, "evals.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            if entry["step"] == 0:
                return entry["pass@1"]
    return None


def run(config, workdir: str) -> dict:
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    metrics_lib.quiet_library_logs()
    setup.write_run_config(config, workdir)
    started = time.perf_counter()
    run_ = Run(config, workdir)
    try:
        return _train(run_, started)
    finally:
        run_.close()


def _train(run_: Run, started: float) -> dict:
    config, workdir = run_.config, run_.workdir
    restored = run_.ckpt.restore_latest(run_.state, run_.host)
    start_step = 0
    if restored is not None:
        run_.state, start_step = restored, run_.ckpt.latest_step()
        logger.info("resumed from %s at step %d", run_.ckpt.directory, start_step)
    eval_problems = []
    if config.eval.dataset:
        eval_problems = problems_lib.load_problems(config.eval.dataset, run_.tokenizer, config.data)
        eval_problems = eval_problems[: config.eval.num_problems or None]
    final: dict = {}
    if eval_problems and start_step == 0:
        final["accuracy_before"] = _evaluate(run_, eval_problems, 0)["pass@1"]
    elif eval_problems:
        final["accuracy_before"] = _before_accuracy(workdir)
    steps = total_steps(config)
    writer = metrics_lib.MetricWriter(workdir, total_steps=steps)
    window: list[dict] = []
    train_started = time.perf_counter()
    ahead, r = None, config.rollout
    if r.max_staleness and r.backend == "engine":
        ahead = StreamingAhead(run_, functools.partial(collect, run_))
    elif r.max_staleness:
        ahead = RolloutAhead(functools.partial(collect, run_), max_staleness=r.max_staleness)
    if ahead is not None:
        ahead.start(start_step, steps, run_.engine_params(), version=start_step)
    try:
        final.update(_steps(run_, ahead, start_step, steps, eval_problems, writer, window))
    finally:
        if ahead is not None:
            ahead.close()
    final["train_time_s"] = time.perf_counter() - train_started
    return _finish(run_, final, eval_problems, writer, steps, started)


@jax.jit
def _copy_params(params):
    return jax.tree.map(lambda x: x.copy(), params)


def _steps(run_: Run, ahead, start_step: int, steps: int, eval_problems, writer, window) -> dict:
    """The training steps: synchronous (`train_step`) or with rollouts collected ahead; the averaged metrics."""
    config, final = run_.config, {}
    for step in range(start_step, steps):
        if ahead is None:
            metrics, host = train_step(run_, step), run_.host.snapshot()
        else:
            collected, waited_s = ahead.take(step)
            metrics, host = update(run_, step, collected, waited_s), collected.host
            ahead.after_update(step, steps, run_.engine_params, version=step + 1)
        window.append(metrics)
        done = step + 1
        run_.ckpt.maybe_save(done, run_.state, host, last=done == steps)
        if config.eval.every and eval_problems and done % config.eval.every == 0 and done < steps:
            if ahead is not None:
                ahead.drain()  # the verifier pool and the cores go to the evaluation
            metrics["eval/pass_at_1"] = _evaluate(run_, eval_problems, done)["pass@1"]
        if done % config.train.log_every == 0 or done == steps:
            keys = {k for m in window for k in m}
            averaged = {k: float(np.mean([m[k] for m in window if k in m])) for k in keys}
            writer.write_scalars(done, averaged)
            final.update(averaged)
            window = []
    return final


def _finish(run_: Run, final: dict, eval_problems, writer, steps: int, started: float) -> dict:
    config, workdir = run_.config, run_.workdir
    if eval_problems:
        result = _evaluate(run_, eval_problems, steps)
        writer.write_scalars(steps, {"eval/pass_at_1": result["pass@1"]})
        final["accuracy_after"] = result["pass@1"]
        final["eval_example"] = result["example"]
    writer.close()
    run_.ckpt.maybe_save(steps, run_.state, run_.host.snapshot(), last=True)
    if config.export.hf:
        final["export_dir"] = checkpoint_lib.export_hf(
            run_.model_config, run_.params(), os.path.join(workdir, "export", "hf"), tokenizer_dir=run_.tokenizer_dir
        )
    final.update(step=steps, total_time_s=time.perf_counter() - started)
    return final
