"""The SFT train step: a pure `step(state, batch, rng) -> (state, metrics)`, jitted over a Mesh.

    step = make_sft_step(model_config, optimizer, schedule, mesh=mesh, rules=rules,
                         state_shardings=shardings, loss_settings=LossSettings(), microbatches=4)
    state, metrics = step(state, batch, rng)

Traced inside the activation-sharding context with the state donated (`partitioning.jit_step`, as the GRPO
update). With `microbatches > 1` the batch is split along its rows and gradients are summed over a
`lax.scan`; every microbatch divides by the token count of the whole batch, so the result is the
full-batch token mean, not a mean of microbatch means. Mixed precision comes from the
model config: params are kept in `param_dtype` (float32 masters) and cast to `compute_dtype` in
every matmul; gradients and optimiser moments stay in `param_dtype`.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from polaris_jax.models import moe
from polaris_jax.models.sharding import DEFAULT_RULES
from polaris_jax.train import losses, partitioning
from polaris_jax.train import state as state_lib


def sft_step_fn(
    model_config,
    optimizer,
    schedule,
    loss_settings: losses.LossSettings,
    microbatches: int = 1,
    microbatch_sharding=None,
):
    """The un-jitted step; `make_sft_step` wraps it with shardings and donation."""

    def step(state, batch, rng):
        del rng  # SFT has no stochastic layers; the argument keeps one signature for the SFT and GRPO steps
        frozen = state["frozen"]
        num_target_tokens = jnp.maximum(jnp.sum(batch["loss_mask_bt"].astype(jnp.float32)), 1.0)

        def loss_fn(trainable, mb):
            params = state_lib.combine(trainable, frozen)
            return losses.sft_loss(
                model_config,
                params,
                mb,
                loss_settings,
                num_target_tokens=num_target_tokens,
                aux_weight=1.0 / microbatches,
            )

        loss, terms, grads = losses.accumulate_gradients(
            loss_fn, state["params"], batch, microbatches, microbatch_sharding
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss,
            "ce_loss": terms["ce_sum"] / num_target_tokens,
            "z_loss": terms["z_sum"] / num_target_tokens,
            "router_aux_loss": terms["router_aux_loss"],
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "learning_rate": schedule(state["step"]),
            "target_tokens": num_target_tokens,
        }
        if "router" in terms:
            metrics.update(moe.routing_metrics(terms["router"]))
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, metrics

    return step


def make_sft_step(
    model_config,
    optimizer,
    schedule,
    *,
    mesh: Mesh,
    state_shardings: dict,
    rules=DEFAULT_RULES,
    loss_settings: losses.LossSettings = losses.LossSettings(),
    microbatches: int = 1,
    batch_shape: tuple[int, int] | None = None,
    compiler_options: dict | None = None,
):
    """Jitted `step(state, batch, rng) -> (state, metrics)` with explicit shardings; the state is donated.

    `batch_shape` (rows, length) lets the rules skip mesh axes that do not divide the rows;
    `compiler_options` go to XLA (e.g. {"xla_backend_optimization_level": 0} for quick CPU tests)."""
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    micro_shape = None if batch_shape is None else (microbatches, batch_shape[0] // microbatches, batch_shape[1])
    micro_sharding = NamedSharding(mesh, partitioning.batch_spec(mesh, rules, micro_shape, leading=1))
    step = sft_step_fn(model_config, optimizer, schedule, loss_settings, microbatches, micro_sharding)
    rep = partitioning.replicated(mesh)
    return partitioning.jit_step(
        step,
        mesh=mesh,
        rules=rules,
        in_shardings=(state_shardings, partitioning.batch_shardings(mesh, rules, batch_shape), rep),
        out_shardings=(state_shardings, rep),
        compiler_options=compiler_options,
    )
