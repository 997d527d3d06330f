"""The GRPO update: a pure, jitted `update(state, batch, rng, ref_params) -> (state, metrics)`.

One call consumes one scored rollout batch:
  1. old log-probs of the sampled tokens under the pre-update params (and reference log-probs when a
     reference is kept), without gradient;
  2. `num_iterations` (mu) passes over the batch, each split into `minibatches` optimizer steps, run
     as one `lax.scan`; each minibatch may be split again into `microbatches` for gradient
     accumulation, weighted so the result equals the full-minibatch loss of every aggregation mode.
The objective is `rl.rl_loss` (policy loss, aggregation, KL, entropy, TIS), chosen by name.

Shapes are fixed per stage: tokens [B, P + R] (left-padded prompt, then the response), responses
[B, R]; so the function compiles once per stage. The state is donated. An update whose loss or
gradient is not finite is not applied (params and optimizer state are kept) and is counted in
`nonfinite_updates`, so the host can stop the run with the last good state intact.

Batch entries: tokens_bt, positions_bt, segment_ids_bt [B, T]; response_br, mask_br,
sampler_logprobs_br [B, R]; advantages_b [B].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from polaris_jax.models.sharding import DEFAULT_RULES, logical_to_spec, param_shardings
from polaris_jax.models.transformer import forward
from polaris_jax.train import losses, rl
from polaris_jax.train import state as state_lib
from polaris_jax.train.losses import accumulate_gradients, split_microbatches

UPDATE_KEYS = ("tokens_bt", "positions_bt", "segment_ids_bt", "response_br", "mask_br", "sampler_logprobs_br",
               "advantages_b")
# How each aggregation mode's microbatch losses are weighted so they sum to the minibatch loss.
_MICRO_WEIGHT = {"token-mean": "tokens", "seq-mean-token-mean": "rows_with_tokens", "seq-mean-token-sum-norm": "rows"}


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """Static (hashable) hyper-parameters of the update; one instance per stage."""

    max_response_len: int
    temperature: float = 1.0
    policy_loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float | None = None
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0
    kl_type: str = "k3"
    use_reference: bool = False
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    num_iterations: int = 1
    minibatches: int = 1
    microbatches: int = 1
    chunk_size: int = 512

    def __post_init__(self):
        if self.microbatches > 1 and self.loss_agg_mode not in _MICRO_WEIGHT:
            raise ValueError(f"microbatches > 1 needs a known microbatch weighting for loss_agg_mode="
                             f"{self.loss_agg_mode!r}; known: {sorted(_MICRO_WEIGHT)}")
        if self.kl_coef and not self.use_reference:
            raise ValueError(f"kl_coef={self.kl_coef} needs use_reference=True")


def response_stats(model_config, params, batch: dict, settings: UpdateSettings) -> dict:
    """{logprobs, entropy} [B, R] of the response tokens at the sampling temperature."""
    r = batch["response_br"].shape[1]
    p = batch["tokens_bt"].shape[1] - r
    hidden_btd, _ = forward(model_config, params, batch["tokens_bt"], batch["positions_bt"],
                            segment_ids_bt=batch["segment_ids_bt"], return_hidden=True)
    # The token at position t is predicted from position t - 1: response token j from slot p - 1 + j.
    hidden_brd = hidden_btd[:, p - 1:p - 1 + r]
    return losses.hidden_token_stats(model_config, params, hidden_brd, batch["response_br"],
                                     chunk_size=settings.chunk_size, temperature=settings.temperature,
                                     with_entropy=True)


def _no_grad_logprobs(model_config, params, batch, settings):
    """Log-probs of the whole batch, microbatch by microbatch (bounded activation memory)."""
    keys = ("tokens_bt", "positions_bt", "segment_ids_bt", "response_br")
    micro = split_microbatches({k: batch[k] for k in keys}, settings.microbatches * settings.minibatches)
    lp = jax.lax.map(lambda mb: response_stats(model_config, params, mb, settings)["logprobs"], micro)
    rows = batch["response_br"].shape[0]
    return jax.lax.stop_gradient(lp.swapaxes(0, 1).reshape(rows, -1))


def _micro_weight(mask_br, total_mask_br, mode: str):
    kind = _MICRO_WEIGHT.get(mode, "rows")
    if kind == "tokens":
        return jnp.sum(mask_br) / jnp.maximum(jnp.sum(total_mask_br), 1.0)
    if kind == "rows_with_tokens":
        has = lambda m: jnp.sum((jnp.sum(m, axis=-1) > 0).astype(jnp.float32))
        return has(mask_br) / jnp.maximum(has(total_mask_br), 1.0)
    return mask_br.shape[0] / total_mask_br.shape[0]


def _rl_loss(logprobs_br, mb, mask_br, entropy_br, settings: UpdateSettings):
    kwargs = {}
    if settings.use_reference:
        kwargs.update(ref_logprobs_bt=mb["ref_logprobs_br"], kl_coef=settings.kl_coef, kl_type=settings.kl_type)
    if settings.tis_cap is not None:
        kwargs.update(sampler_logprobs_bt=mb["sampler_logprobs_br"], tis_cap=settings.tis_cap)
    return rl.rl_loss(logprobs_br, mb["old_logprobs_br"], mb["advantages_b"], mask_br,
                      policy_loss=settings.policy_loss, clip_low=settings.clip_low, clip_high=settings.clip_high,
                      clip_ratio_c=settings.clip_ratio_c, loss_agg_mode=settings.loss_agg_mode,
                      max_response_len=settings.max_response_len, entropy_bt=entropy_br,
                      entropy_coef=settings.entropy_coef, **kwargs)


def minibatch_loss(model_config, trainable, frozen, mb: dict, settings: UpdateSettings, total_mask_br):
    """rl_loss of one microbatch, weighted so the microbatches of a minibatch sum to its loss."""
    params = state_lib.combine(trainable, frozen)
    stats = response_stats(model_config, params, mb, settings)
    # Without an entropy bonus the entropy is only a metric: no gradient flows through it.
    entropy_br = stats["entropy"] if settings.entropy_coef else jax.lax.stop_gradient(stats["entropy"])
    mask_br = mb["mask_br"].astype(jnp.float32)
    loss, metrics = _rl_loss(stats["logprobs"], mb, mask_br, entropy_br, settings)
    weight = _micro_weight(mask_br, total_mask_br, settings.loss_agg_mode)
    token_share = jnp.sum(mask_br) / jnp.maximum(jnp.sum(total_mask_br), 1.0)
    metrics = {k: v * token_share for k, v in metrics.items() if k != "response_tokens"}
    return loss * weight, metrics


def _minibatch_grads(model_config, trainable, frozen, mb: dict, settings: UpdateSettings):
    """(loss, metrics, grads) of one minibatch, accumulated over its microbatches in float32."""
    total_mask_br = mb["mask_br"].astype(jnp.float32)
    return accumulate_gradients(
        lambda t, m: minibatch_loss(model_config, t, frozen, m, settings, total_mask_br),
        trainable, mb, settings.microbatches)


def _finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def grpo_update_fn(model_config, optimizer, schedule, settings: UpdateSettings):
    """The un-jitted update; `make_grpo_update` wraps it with shardings and donation."""
    def update(state, batch, rng, ref_params):
        del rng  # the update is deterministic; the argument keeps the SFT/GRPO step signature
        batch = dict(batch)
        batch["old_logprobs_br"] = _no_grad_logprobs(model_config, state_lib.full_params(state), batch, settings)
        if settings.use_reference:
            batch["ref_logprobs_br"] = _no_grad_logprobs(model_config, ref_params, batch, settings)
        minis = split_microbatches(batch, settings.minibatches)

        def one_update(state, index):
            mb = jax.tree.map(lambda x: x[index % settings.minibatches], minis)
            loss, metrics, grads = _minibatch_grads(model_config, state["params"], state["frozen"], mb, settings)
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            ok = jnp.isfinite(loss) & _finite(grads)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            new_state = {**state, "params": keep(params, state["params"]),
                         "opt_state": keep(opt_state, state["opt_state"]),
                         "step": state["step"] + ok.astype(state["step"].dtype)}
            metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state["step"]),
                       "nonfinite": 1.0 - ok.astype(jnp.float32)}
            return new_state, metrics

        updates = settings.num_iterations * settings.minibatches
        state, per_update = jax.lax.scan(one_update, state, jnp.arange(updates))
        metrics = {k: jnp.mean(v) for k, v in per_update.items() if k != "nonfinite"}
        nonfinite = per_update["nonfinite"]
        metrics["nonfinite_updates"] = jnp.sum(nonfinite)
        # Index of the first update (iteration * minibatches + minibatch) that was not finite, else -1.
        metrics["first_nonfinite_update"] = jnp.where(jnp.any(nonfinite > 0), jnp.argmax(nonfinite > 0), -1)
        mask_br = batch["mask_br"].astype(jnp.float32)
        metrics["sampler_logprob_gap"] = rl.masked_mean(
            jnp.abs(batch["old_logprobs_br"] - batch["sampler_logprobs_br"]), mask_br)
        metrics["param_norm"] = optax.global_norm(state["params"])
        return state, metrics

    return update


def batch_shardings(mesh: Mesh, rules=DEFAULT_RULES, rows: int | None = None) -> dict:
    """Rows of every update-batch entry split over the mesh's batch axes."""
    def sharding(ndim):
        axes = ("batch",) + ("length",) * (ndim - 1)
        shape = None if rows is None else (rows,) + (1,) * (ndim - 1)
        return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape))
    return {k: sharding(1 if k.endswith("_b") else 2) for k in UPDATE_KEYS}


def make_grpo_update(model_config, optimizer, schedule, settings: UpdateSettings, *, mesh: Mesh,
                     state_shardings: dict, rules=DEFAULT_RULES, rows: int | None = None, compiler_options=None):
    """Jitted `update(state, batch, rng, ref_params) -> (state, metrics)`; the state is donated.
    `ref_params` is None unless `settings.use_reference`."""
    fn = grpo_update_fn(model_config, optimizer, schedule, settings)
    replicated = NamedSharding(mesh, PartitionSpec())
    ref_shardings = param_shardings(model_config, mesh, rules) if settings.use_reference else None
    return jax.jit(fn, in_shardings=(state_shardings, batch_shardings(mesh, rules, rows), replicated, ref_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,), compiler_options=compiler_options)


def update_batch(rollout_batch: dict, advantages_b: np.ndarray, mask_br: np.ndarray) -> dict:
    """Host arrays of the update from a shaped rollout batch (prompt left-padded, response right-padded)."""
    prompt_bp, response_br = rollout_batch["prompt_bp"], rollout_batch["response_br"]
    p, r = prompt_bp.shape[1], response_br.shape[1]
    prompt_valid_bp = np.arange(p)[None, :] >= p - rollout_batch["prompt_len_b"][:, None]
    response_valid_br = np.arange(r)[None, :] < rollout_batch["response_len_b"][:, None]
    segment_ids_bt = np.concatenate([prompt_valid_bp, response_valid_br], axis=1).astype(np.int32)
    return {
        "tokens_bt": np.concatenate([prompt_bp, response_br], axis=1).astype(np.int32),
        "positions_bt": np.maximum(np.cumsum(segment_ids_bt, axis=1) - 1, 0).astype(np.int32),
        "segment_ids_bt": segment_ids_bt,
        "response_br": response_br.astype(np.int32),
        "mask_br": (np.asarray(mask_br) * response_valid_br).astype(np.float32),
        "sampler_logprobs_br": rollout_batch["sampler_logprobs_br"].astype(np.float32),
        "advantages_b": np.asarray(advantages_b, np.float32),
    }


def put_update_batch(batch: dict, shardings: dict) -> dict:
    """The whole update batch (every process holds all of it: rollouts are gathered) in its shards."""
    if jax.process_count() == 1:
        return {k: jax.device_put(batch[k], shardings[k]) for k in UPDATE_KEYS}
    return {k: jax.make_array_from_callback(batch[k].shape, shardings[k], lambda index, x=batch[k]: x[index])
            for k in UPDATE_KEYS}
