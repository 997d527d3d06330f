"""Shared pieces of the GRPO tests: a tiny model and state, random rollout batches, settings from the config."""

import jax
import numpy as np
import optax

from polaris_jax.models import ModelConfig, make_mesh
from polaris_jax.rollout import Rollouts
from polaris_jax.sampling import FINISH_EOS
from polaris_jax.train import partitioning
from polaris_jax.train.grpo import step as grpo_step
from polaris_jax.train.grpo.config import Stage, default_config
from polaris_jax.train.optimizer import make_optimizer

VOCAB = 32
PROMPT, RESPONSE = 8, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # both sides of every comparison use it


def tiny_config():
    return ModelConfig.tiny(vocab_size=VOCAB)


def grpo_config(**algo):
    """`default_config()` with `algo` overrides and a one-stage schedule of RESPONSE-token responses."""
    c = default_config()
    c.algo.update(algo)
    c.schedule.max_response_len = (RESPONSE,)
    c.schedule.datasets = ("synthetic_arith:train:8",)
    c.train.loss_chunk_size = 8
    return c


def settings(*, temperature: float = 1.0, **algo) -> grpo_step.UpdateSettings:
    """The update settings `update_settings` makes of `grpo_config(**algo)` (clip range and all defaults from
    the config)."""
    stage = Stage(index=0, first_step=0, steps=1, max_response_len=RESPONSE, temperature=temperature, dataset="")
    return grpo_step.update_settings(grpo_config(**algo), stage)


def random_rollout(seed: int, rows: int = 8, *, prompt: int = PROMPT, response: int = RESPONSE) -> Rollouts:
    """A rollout batch with ragged prompts/responses, as `rollout.sample_and_verify` builds it."""
    rng = np.random.default_rng(seed)
    prompt_len_b = rng.integers(2, prompt + 1, rows).astype(np.int32)
    response_len_b = rng.integers(1, response + 1, rows).astype(np.int32)
    prompt_bt = np.zeros((rows, prompt), np.int32)
    response_br = np.zeros((rows, response), np.int32)
    for i in range(rows):
        prompt_bt[i, prompt - prompt_len_b[i] :] = rng.integers(1, VOCAB, prompt_len_b[i])
        response_br[i, : response_len_b[i]] = rng.integers(1, VOCAB, response_len_b[i])
    return Rollouts(
        prompt_bt=prompt_bt,
        prompt_len_b=prompt_len_b,
        response_br=response_br,
        response_len_b=response_len_b,
        sampler_logprobs_br=-rng.uniform(0.5, 4.0, (rows, response)).astype(np.float32),
        finish_b=np.full(rows, FINISH_EOS, np.int32),
        correct_b=np.zeros(rows, np.float32),
        rewards_b=np.zeros(rows, np.float32),
        group_b=np.arange(rows, dtype=np.int32),
    )


def host_update_batch(seed: int, rows: int = 8) -> grpo_step.UpdateBatch:
    rollout = random_rollout(seed, rows)
    advantages_b = np.random.default_rng(seed + 100).normal(size=rows).astype(np.float32)
    mask_br = np.ones_like(rollout.response_br, np.float32)
    return grpo_step.update_batch(rollout, advantages_b, mask_br)


def make_update(
    settings: grpo_step.UpdateSettings,
    *,
    mesh=None,
    rows: int = 8,
    lr: float = 1e-2,
    model_config=None,
    seed: int = 0,
    sgd: bool = False,
):
    """(update fn, fresh state, batch shardings, model config) for a tiny model on `mesh`."""
    model_config = model_config or tiny_config()
    mesh = mesh or make_mesh({"fsdp": 1}, jax.devices()[:1])
    params = partitioning.init_sharded_params(model_config, jax.random.PRNGKey(seed), mesh)
    mask = jax.tree.map(lambda _: True, params)
    optimizer, schedule = make_optimizer(peak_lr=lr, total_steps=100, grad_clip_norm=1.0)
    if sgd:  # updates linear in the gradient, so params compare gradients directly
        optimizer = optax.sgd(schedule)
    shardings = partitioning.state_shardings(model_config, optimizer, mask, mesh)
    state = partitioning.init_sharded_state(params, optimizer, jax.random.PRNGKey(1), mask, shardings)
    update = grpo_step.make_grpo_update(
        model_config,
        optimizer,
        schedule,
        settings,
        mesh=mesh,
        state_shardings=shardings,
        rows=rows,
        compiler_options=FAST_COMPILE,
    )
    batch_shardings = grpo_step.batch_shardings(
        mesh, rows=rows, packed=bool(settings.pack_tokens), replay=settings.router_replay
    )
    return update, state, batch_shardings, model_config
