"""The three hot programs on random weights, built once for `device_suite` (timed) and the lowering tests
(exported for tpu and cuda on CPU): the SFT train step, the GRPO update and the engine's decode step.

Each builder returns a `Case`: the jitted function, its arguments and its static keyword arguments, so
`case.run()` calls it and `case.export(platforms)` lowers it with `jax.export` (multi-platform).
Imports stay inside a stock JAX install (jax, flax, optax): no data, tokenizer or config packages.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polaris_jax.models import make_mesh, paged_attention
from polaris_jax.models.params import init_params
from polaris_jax.sampling import engine_steps
from polaris_jax.sampling.strategies import RowSettings
from polaris_jax.train import losses, partitioning
from polaris_jax.train.grpo import step as grpo_step
from polaris_jax.train.optimizer import make_optimizer
from polaris_jax.train.sft.step import make_sft_step

# Custom calls that name each kernel in lowered StableHLO.
KERNEL_CALLS = {
    "mosaic": "tpu_custom_call",  # splash attention, TPU paged attention, megablox
    "triton": "__gpu$xla.gpu.triton",  # Pallas GPU paged attention
    "cudnn": "__cudnn$fmha",  # cuDNN fused attention (the prefix of its forward and backward calls)
    "ragged_dot": "ragged_dot",  # jax.lax.ragged_dot (the MoE grouped matmul on TPU)
}


UNGUARANTEED_CALLS = (
    KERNEL_CALLS["triton"],
    *(f"__cudnn$fmha{kind}Softmax{bwd}" for kind in ("", "ScaleBias") for bwd in ("", "Backward")),
)


@dataclasses.dataclass
class Case:
    fn: Any
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)

    def run(self):
        return self.fn(*self.args, **self.kwargs)

    def export(self, platforms: tuple[str, ...]):
        # Pallas Triton and cuDNN calls carry no serialization-compatibility guarantee; we lower them, not ship them.
        unguaranteed = [jax.export.DisabledSafetyCheck.custom_call(name) for name in UNGUARANTEED_CALLS]
        export = jax.export.export(self.fn, platforms=platforms, disabled_checks=unguaranteed)
        return export(*self.args, **self.kwargs)


def kernels_in(text: str) -> set[str]:
    """The KERNEL_CALLS names present in lowered module text."""
    return {name for name, call in KERNEL_CALLS.items() if call in text}


def _train_state(model_config, mesh, optimizer):
    params = partitioning.init_sharded_params(model_config, jax.random.key(0), mesh)
    mask = jax.tree.map(lambda _: True, params)
    shardings = partitioning.state_shardings(model_config, optimizer, mask, mesh)
    return partitioning.init_sharded_state(params, optimizer, jax.random.key(1), mask, shardings), shardings


def sft_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    """Random full rows, every token trained."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (rows, length + 1)).astype(np.int32)
    ones = np.ones((rows, length), np.int32)
    return {
        "tokens_bt": tokens[:, :-1],
        "targets_bt": tokens[:, 1:],
        "segment_ids_bt": ones,
        "loss_mask_bt": ones,
        "positions_bt": np.broadcast_to(np.arange(length, dtype=np.int32), ones.shape).copy(),
    }


def sft_case(model_config, rows: int, length: int) -> Case:
    """One SFT step (forward, backward, AdamW with clipping) over all devices as FSDP."""
    mesh = make_mesh({"fsdp": -1})
    optimizer, schedule = make_optimizer(peak_lr=1e-5, total_steps=1000, grad_clip_norm=1.0)
    state, shardings = _train_state(model_config, mesh, optimizer)
    step = make_sft_step(
        model_config,
        optimizer,
        schedule,
        mesh=mesh,
        state_shardings=shardings,
        loss_settings=losses.LossSettings(chunk_size=min(length, 1024)),
        batch_shape=(rows, length),
    )
    batch = partitioning.put_batch(
        sft_batch(rows, length, model_config.vocab_size),
        partitioning.batch_shardings(mesh, batch_shape=(rows, length)),
    )
    return Case(step, (state, batch, jax.random.key(0)))


def update_batch(rows: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    """A GRPO update batch of random prompts and responses, as `grpo_step.update_batch` lays them out."""
    rng = np.random.default_rng(seed)
    length = prompt_len + response_len
    tokens = rng.integers(1, vocab, (rows, length)).astype(np.int32)
    return grpo_step.UpdateBatch(
        tokens_bt=tokens,
        positions_bt=np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
        segment_ids_bt=np.ones((rows, length), np.int32),
        response_br=tokens[:, prompt_len:],
        mask_br=np.ones((rows, response_len), np.float32),
        sampler_logprobs_br=np.full((rows, response_len), -2.0, np.float32),
        advantages_b=rng.standard_normal(rows).astype(np.float32),
    )


def grpo_case(model_config, batch, microbatches: int = 1) -> Case:
    """One GRPO update (old logprobs, then the clipped policy-gradient step) on `batch` (an UpdateBatch),
    its gradient accumulated over `microbatches` passes."""
    mesh = make_mesh({"fsdp": -1})
    rows, response_len = batch.mask_br.shape
    optimizer, schedule = make_optimizer(peak_lr=1e-6, total_steps=1000, grad_clip_norm=1.0)
    state, shardings = _train_state(model_config, mesh, optimizer)
    settings = grpo_step.UpdateSettings(
        max_response_len=response_len,
        chunk_size=min(response_len, 1024),
        microbatches=microbatches,
        policy_loss_kwargs=dict(clip_low=0.2, clip_high=0.28),  # DAPO clip-higher, as the recipes
    )
    update = grpo_step.make_grpo_update(
        model_config, optimizer, schedule, settings, mesh=mesh, state_shardings=shardings, rows=rows
    )
    device_batch = grpo_step.put_update_batch(batch, grpo_step.batch_shardings(mesh, rows=rows))
    return Case(update, (state, device_batch, jax.random.key(0), None))


def decode_case(model_config, rows: int, context: int, *, page_size: int = 16, block: int = 8, params=None) -> Case:
    """One engine decode call: `rows` rows that each hold `context` tokens in their pages and decode `block`
    more (greedy), the pages laid out one row after another."""
    pages_per_row = -(-(context + block) // page_size)
    kv_pages = paged_attention.init_kv_pages(model_config, rows * pages_per_row + 1, page_size)
    table = 1 + np.arange(rows * pages_per_row, dtype=np.int32).reshape(rows, pages_per_row)
    ints = lambda value: np.full(rows, value, np.int32)
    batch = engine_steps.DecodeBatch(
        token_b=ints(1),
        position_b=ints(context - 1),
        table_bp=table,
        budget_b=ints(block),
        seed_b=ints(0),
        sample_b=np.arange(rows, dtype=np.int32),
        num_new_b=ints(0),
        eos_ids_b=np.full((rows, 1), -1, np.int32),
        settings=RowSettings.stack([], rows),
    )
    if params is None:
        params = jax.jit(lambda key: init_params(model_config, key))(jax.random.key(0))
    return Case(
        engine_steps.decode,
        (model_config, params, kv_pages, jax.tree.map(jnp.asarray, batch)),
        dict(block=block),
    )
