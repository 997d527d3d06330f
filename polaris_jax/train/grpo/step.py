"""The GRPO update: a pure, jitted `update(state, batch, rng, ref_params) -> (state, metrics)`.

One call consumes one scored rollout batch (an `UpdateBatch`):
  1. old log-probs of the sampled tokens under the pre-update params (and reference log-probs when a
     reference is kept), without gradient;
  2. `num_iterations` (mu) passes over the batch, each split into `minibatches` optimizer steps, run
     as one `lax.scan`; each minibatch may be split again into `microbatches` for gradient
     accumulation, weighted (by the aggregation's registered `micro_weight`) so the result equals the
     full-minibatch loss.
The objective is `rl.rl_loss` (policy loss, aggregation, KL, entropy, TIS), chosen by name; the
settings come from the config through `update_settings(config, stage)`.

Shapes are fixed per stage: tokens [B, P + R] (left-padded prompt, then the response), responses
[B, R]; so the function compiles once per stage. Like the SFT step it is traced inside the
activation-sharding context and donates the state (`partitioning.jit_step`). An update whose loss or
gradient is not finite is not applied (params and optimizer state are kept) and is counted in
`nonfinite_updates`, so the host can stop the run with the last good state intact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from polaris_jax.models import moe
from polaris_jax.models.sharding import DEFAULT_RULES, logical_to_spec, param_shardings
from polaris_jax.models.transformer import forward
from polaris_jax.sampling import sampler
from polaris_jax.train import losses, partitioning, rl
from polaris_jax.train import state as state_lib
from polaris_jax.train.grpo.packing import PackedUpdateBatch, to_responses
from polaris_jax.train.losses import accumulate_gradients, split_microbatches


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UpdateBatch:
    """One update's input, B rows of T = P + R tokens: the prompt left-padded to P, then the response
    right-padded to R. numpy on the host (`update_batch`), sharded jax.Arrays on the devices
    (`put_update_batch`).

    tokens_bt: int32 [B, T] prompt then response ids.
    positions_bt: int32 [B, T] 0 at the first real prompt token.
    segment_ids_bt: int32 [B, T] 1 on real tokens, 0 on padding.
    response_br: int32 [B, R] the response ids (the targets).
    mask_br: float32 [B, R] 1 on the response tokens the loss trains on.
    sampler_logprobs_br: float32 [B, R] the sampler's log-probabilities of the response tokens.
    advantages_b: float32 [B] one advantage per response.
    routed_experts_btlk: int16 [B, T, MoE layers, k] or None: experts to replay (router replay; -1 = route).
    """

    tokens_bt: Any
    positions_bt: Any
    segment_ids_bt: Any
    response_br: Any
    mask_br: Any
    sampler_logprobs_br: Any
    advantages_b: Any
    routed_experts_btlk: Any = None

    def replace(self, **fields) -> UpdateBatch:
        return dataclasses.replace(self, **fields)


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """Static (hashable) hyper-parameters of the update; one instance per stage (`update_settings`)."""

    max_response_len: int
    temperature: float = 1.0
    policy_loss: str = "ppo_clip"
    # The loss's keyword arguments as sorted (name, value) pairs; a mapping is sorted into them.
    policy_loss_kwargs: tuple[tuple[str, Any], ...] = ()
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0
    kl_type: str = "k3"
    use_reference: bool = False
    entropy_coef: float = 0.0
    off_policy: str = "none"
    off_policy_cap: float = 2.0
    num_iterations: int = 1
    minibatches: int = 1
    microbatches: int = 1
    chunk_size: int = 512
    pack_tokens: int = 0  # > 0: the batch is a packing.PackedUpdateBatch with rows of this many tokens
    # Packed: packed rows per micro pass and batch shard (algo.micro_tokens / pack_tokens); the number of
    # micro passes is then K / (micro_rows x shards), read from the batch's shape (0 = `microbatches`).
    micro_rows: int = 0
    router_replay: bool = False  # the batch carries the engine's experts and the forward replays them

    @property
    def packed_row_multiple(self) -> int:
        """Packed rows per micro pass and batch shard: K is a multiple of this times the batch shards."""
        return self.micro_rows or self.microbatches

    def __post_init__(self):
        if isinstance(self.policy_loss_kwargs, Mapping):
            object.__setattr__(self, "policy_loss_kwargs", tuple(sorted(self.policy_loss_kwargs.items())))
        rl.POLICY_LOSSES.bind(self.policy_loss, dict(self.policy_loss_kwargs))
        if self.microbatches > 1 and rl.micro_weight(self.loss_agg_mode) is None:
            raise ValueError(
                f"microbatches > 1 needs a microbatch weighting, and loss_agg_mode="
                f"{self.loss_agg_mode!r} registers none"
            )
        if self.kl_coef and not self.use_reference:
            raise ValueError(f"kl_coef={self.kl_coef} needs use_reference=True")


def update_settings(config, stage) -> UpdateSettings:
    """The update's settings for one stage (a `config.Stage`) of a validated GRPO config."""
    from polaris_jax.train.grpo.config import policy_loss_kwargs  # ml_collections: not for benchmarks.device_suite

    a = config.algo
    return UpdateSettings(
        max_response_len=stage.max_response_len,
        temperature=stage.temperature,
        policy_loss=a.policy_loss,
        policy_loss_kwargs=policy_loss_kwargs(config),
        loss_agg_mode=a.loss_agg_mode,
        kl_coef=a.kl_coef,
        kl_type=a.kl_type,
        use_reference=a.use_reference,
        entropy_coef=a.entropy_coef,
        off_policy=a.off_policy,
        off_policy_cap=a.off_policy_cap,
        num_iterations=a.num_iterations,
        minibatches=a.minibatches,
        microbatches=a.microbatches,
        chunk_size=config.train.loss_chunk_size,
        pack_tokens=a.pack_tokens,
        micro_rows=a.micro_tokens // a.pack_tokens if a.pack_tokens and a.micro_tokens else 0,
        router_replay=bool(config.rollout.get("router_replay", False)),
    )


def response_stats(model_config, params, batch: UpdateBatch, settings: UpdateSettings) -> dict:
    """{logprobs, entropy} [B, R] of the response tokens at the sampling temperature."""
    r = batch.response_br.shape[1]
    p = batch.tokens_bt.shape[1] - r
    hidden_btd, routing = _hidden(
        model_config, params, batch.tokens_bt, batch.positions_bt, batch.segment_ids_bt, batch.routed_experts_btlk
    )
    # The token at position t is predicted from position t - 1: response token j from slot p - 1 + j.
    hidden_brd = hidden_btd[:, p - 1 : p - 1 + r]
    stats = losses.hidden_token_stats(
        model_config,
        params,
        hidden_brd,
        batch.response_br,
        chunk_size=settings.chunk_size,
        temperature=settings.temperature,
        with_entropy=True,
    )
    return {**stats, **routing}


def _hidden(model_config, params, tokens_bt, positions_bt, segment_ids_bt, routed_experts_btlk=None):
    """(final hidden states, {"routing": metrics} for an MoE model, else {}); replays the given experts."""
    hidden_btd, _, aux = forward(
        model_config,
        params,
        tokens_bt,
        positions_bt,
        segment_ids_bt=segment_ids_bt,
        return_hidden=True,
        return_aux=True,
        routed_experts=None if routed_experts_btlk is None else jnp.moveaxis(routed_experts_btlk, 2, 0),
    )
    routing = {"routing": moe.routing_metrics(jax.lax.stop_gradient(aux["router"]))} if "router" in aux else {}
    return hidden_btd, routing


def _no_grad_logprobs(model_config, params, batch: UpdateBatch, settings):
    """Log-probs of the whole batch, microbatch by microbatch (bounded activation memory)."""
    micro = split_microbatches(batch, settings.microbatches * settings.minibatches)
    lp = jax.lax.map(lambda mb: response_stats(model_config, params, mb, settings)["logprobs"], micro)
    rows = batch.response_br.shape[0]
    return jax.lax.stop_gradient(lp.swapaxes(0, 1).reshape(rows, -1))


def _rl_loss(logprobs_br, rows, mask_br, entropy_br, settings: UpdateSettings):
    batch, old_logprobs_br, ref_logprobs_br = rows
    kwargs = {}
    if settings.use_reference:
        kwargs.update(ref_logprobs_bt=ref_logprobs_br, kl_coef=settings.kl_coef, kl_type=settings.kl_type)
    if settings.off_policy != "none":
        kwargs.update(
            sampler_logprobs_bt=batch.sampler_logprobs_br,
            off_policy=settings.off_policy,
            off_policy_cap=settings.off_policy_cap,
        )
    return rl.rl_loss(
        logprobs_br,
        old_logprobs_br,
        batch.advantages_b,
        mask_br,
        policy_loss=settings.policy_loss,
        policy_loss_kwargs=dict(settings.policy_loss_kwargs),
        loss_agg_mode=settings.loss_agg_mode,
        max_response_len=settings.max_response_len,
        entropy_bt=entropy_br,
        entropy_coef=settings.entropy_coef,
        **kwargs,
    )


def minibatch_loss(model_config, trainable, frozen, rows, settings: UpdateSettings, total_mask_br):
    """rl_loss of one microbatch, weighted so the microbatches of a minibatch sum to its loss.
    `rows` is (UpdateBatch, old_logprobs_br, ref_logprobs_br or None) of the microbatch."""
    params = state_lib.combine(trainable, frozen)
    stats = response_stats(model_config, params, rows[0], settings)
    # Without an entropy bonus the entropy is only a metric: no gradient flows through it.
    entropy_br = stats["entropy"] if settings.entropy_coef else jax.lax.stop_gradient(stats["entropy"])
    mask_br = rows[0].mask_br.astype(jnp.float32)
    loss, metrics = _rl_loss(stats["logprobs"], rows, mask_br, entropy_br, settings)
    weight_fn = rl.micro_weight(settings.loss_agg_mode)
    weight = 1.0 if weight_fn is None else weight_fn(mask_br, total_mask_br)
    token_share = jnp.sum(mask_br) / jnp.maximum(jnp.sum(total_mask_br), 1.0)
    metrics = {k: v * token_share for k, v in {**metrics, **stats.get("routing", {})}.items() if k != "response_tokens"}
    return loss * weight, metrics


def _minibatch_grads(model_config, trainable, frozen, rows, settings: UpdateSettings):
    """(loss, metrics, grads) of one minibatch, accumulated over its microbatches in float32."""
    total_mask_br = rows[0].mask_br.astype(jnp.float32)
    return accumulate_gradients(
        lambda t, m: minibatch_loss(model_config, t, frozen, m, settings, total_mask_br),
        trainable,
        rows,
        settings.microbatches,
    )


class _Responses(NamedTuple):
    """A packed minibatch's per-response arrays (what `_rl_loss` reads of a batch, and the index map)."""

    flat_index_br: Any
    mask_br: Any
    sampler_logprobs_br: Any
    advantages_b: Any


def _packed_inputs(batch: PackedUpdateBatch, settings: UpdateSettings):
    """([Mb, B/Mb, ...] per-response arrays, split as the padded path splits rows; [Mb, K, L] packed rows,
    each with its row ids so a microbatch knows which rows it holds)."""
    responses = _Responses(batch.flat_index_br, batch.mask_br, batch.sampler_logprobs_br, batch.advantages_b)
    minibatches, k, _ = batch.tokens_mkl.shape
    rows = dict(
        tokens=batch.tokens_mkl,
        positions=batch.positions_mkl,
        segments=batch.segment_ids_mkl,
        targets=batch.targets_mkl,
        row_ids=jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (minibatches, k)),
    )
    if batch.routed_experts_mklk is not None:
        rows["experts"] = batch.routed_experts_mklk
    return split_microbatches(responses, settings.minibatches), rows


def _packed_stats(model_config, params, rows: dict, settings: UpdateSettings):
    """{logprobs, entropy} [K, L] of each packed position's target (the next response token)."""
    hidden_kld, routing = _hidden(
        model_config, params, rows["tokens"], rows["positions"], rows["segments"], rows.get("experts")
    )
    stats = losses.hidden_token_stats(
        model_config,
        params,
        hidden_kld,
        rows["targets"],
        chunk_size=settings.chunk_size,
        temperature=settings.temperature,
        with_entropy=True,
    )
    return {**stats, **routing}


def _packed_no_grad_logprobs(model_config, params, responses, rows, settings: UpdateSettings):
    """[Mb, B/Mb, R] log-probs of every minibatch's responses, microbatch by microbatch of packed rows."""

    def minibatch(m):
        flat_index_br = responses.flat_index_br[m]
        micro = split_microbatches(jax.tree.map(lambda x: x[m], rows), settings.microbatches)

        def one(total_br, mb):
            lp_kl = _packed_stats(model_config, params, mb, settings)["logprobs"]
            return total_br + to_responses(lp_kl, mb["row_ids"], flat_index_br, settings.microbatches)[0], None

        total_br, _ = jax.lax.scan(one, jnp.zeros(flat_index_br.shape, jnp.float32), micro)
        return total_br

    return jax.lax.stop_gradient(jax.lax.map(minibatch, jnp.arange(responses.flat_index_br.shape[0])))


def _packed_minibatch_grads(model_config, trainable, frozen, minibatch, settings: UpdateSettings):
    """`_minibatch_grads` on packed rows: each microbatch (a slice of packed rows) is scored in the [B, R]
    response layout with the mask of the responses it holds, weighted as the aggregation registers."""
    (responses, old_br, ref_br), rows = minibatch
    total_mask_br = responses.mask_br.astype(jnp.float32)
    weight_fn = rl.micro_weight(settings.loss_agg_mode)

    def loss_fn(t, mb):
        stats = _packed_stats(model_config, state_lib.combine(t, frozen), mb, settings)
        place = lambda v_kl: to_responses(v_kl, mb["row_ids"], responses.flat_index_br, settings.microbatches)
        logprobs_br, in_rows_br = place(stats["logprobs"])
        entropy_br = place(stats["entropy"])[0]
        entropy_br = entropy_br if settings.entropy_coef else jax.lax.stop_gradient(entropy_br)
        mask_br = total_mask_br * in_rows_br
        loss, metrics = _rl_loss(logprobs_br, (responses, old_br, ref_br), mask_br, entropy_br, settings)
        weight = 1.0 if weight_fn is None else weight_fn(mask_br, total_mask_br)
        share = jnp.sum(mask_br) / jnp.maximum(jnp.sum(total_mask_br), 1.0)
        metrics = {**metrics, **stats.get("routing", {})}
        return loss * weight, {k: v * share for k, v in metrics.items() if k != "response_tokens"}

    return accumulate_gradients(loss_fn, trainable, rows, settings.microbatches)


def _finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def grpo_update_fn(model_config, optimizer, schedule, settings: UpdateSettings, batch_shards: int = 1):
    """The un-jitted update; `make_grpo_update` wraps it with shardings and donation."""
    stage_settings = settings

    def update(state, batch, rng, ref_params):
        del rng  # the update is deterministic; the argument keeps the SFT/GRPO step signature
        settings = packed_micro_settings(stage_settings, batch, batch_shards)
        if settings.pack_tokens:
            responses, rows = _packed_inputs(batch, settings)
            logprobs = lambda params: _packed_no_grad_logprobs(model_config, params, responses, rows, settings)  # noqa: E731
            old_br = logprobs(state_lib.full_params(state))
            ref_br = logprobs(ref_params) if settings.use_reference else None
            minis = ((responses, old_br, ref_br), rows)
            grads_fn = _packed_minibatch_grads
            old_logprobs_br = old_br.swapaxes(0, 1).reshape(batch.mask_br.shape)  # back to row order
        else:
            old_logprobs_br = _no_grad_logprobs(model_config, state_lib.full_params(state), batch, settings)
            ref_logprobs_br = (
                _no_grad_logprobs(model_config, ref_params, batch, settings) if settings.use_reference else None
            )
            minis = split_microbatches((batch, old_logprobs_br, ref_logprobs_br), settings.minibatches)
            grads_fn = _minibatch_grads

        def one_update(state, index):
            rows = jax.tree.map(lambda x: x[index % settings.minibatches], minis)
            loss, metrics, grads = grads_fn(model_config, state["params"], state["frozen"], rows, settings)
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            ok = jnp.isfinite(loss) & _finite(grads)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            new_state = {
                **state,
                "params": keep(params, state["params"]),
                "opt_state": keep(opt_state, state["opt_state"]),
                "step": state["step"] + ok.astype(state["step"].dtype),
            }
            metrics = {
                **metrics,
                "loss": loss,
                "grad_norm": optax.global_norm(grads),
                "learning_rate": schedule(state["step"]),
                "nonfinite": 1.0 - ok.astype(jnp.float32),
            }
            return new_state, metrics

        updates = settings.num_iterations * settings.minibatches
        state, per_update = jax.lax.scan(one_update, state, jnp.arange(updates))
        metrics = {k: jnp.mean(v) for k, v in per_update.items() if k != "nonfinite"}
        nonfinite = per_update["nonfinite"]
        metrics["nonfinite_updates"] = jnp.sum(nonfinite)
        # Index of the first update (iteration * minibatches + minibatch) that was not finite, else -1.
        metrics["first_nonfinite_update"] = jnp.where(jnp.any(nonfinite > 0), jnp.argmax(nonfinite > 0), -1)
        mask_br = batch.mask_br.astype(jnp.float32)
        metrics["sampler_logprob_gap"] = rl.masked_mean(jnp.abs(old_logprobs_br - batch.sampler_logprobs_br), mask_br)
        metrics["param_norm"] = optax.global_norm(state["params"])
        return state, metrics

    return update


def packed_micro_settings(settings: UpdateSettings, batch, batch_shards: int) -> UpdateSettings:
    """With a token budget per micro pass (`micro_rows`), the micro-pass count of this packed batch: its K
    rows over micro_rows x batch_shards (K is a static shape, so each K traces its own count)."""
    if not (settings.pack_tokens and settings.micro_rows):
        return settings
    k = batch.tokens_mkl.shape[1]
    per_pass = settings.micro_rows * batch_shards
    if k % per_pass:
        raise ValueError(f"{k} packed rows do not split into micro passes of {per_pass} rows")
    return dataclasses.replace(settings, microbatches=k // per_pass)


def batch_shardings(
    mesh: Mesh, rules=DEFAULT_RULES, rows: int | None = None, packed: bool = False, replay: bool = False
):
    """The sharding of every `UpdateBatch` (or, `packed`, `PackedUpdateBatch`) field: rows split over the
    mesh's batch axes ([Mb, K, L] packed arrays: their K rows); `replay`: the batch carries routed experts."""
    cls = PackedUpdateBatch if packed else UpdateBatch

    def sharding(name: str):
        if name == "routed_experts_btlk":
            shape = None if rows is None else (rows, 1, 1, 1)
            spec = logical_to_spec(("batch", "length", None, None), mesh, rules, shape)
            return NamedSharding(mesh, spec) if replay else None
        if name == "routed_experts_mklk":
            spec = logical_to_spec((None, "batch", "length", None, None), mesh, rules)
            return NamedSharding(mesh, spec) if replay else None
        if name.endswith("_mkl"):
            return NamedSharding(mesh, logical_to_spec((None, "batch", "length"), mesh, rules))
        ndim = 1 if name.endswith("_b") else 2
        axes = ("batch",) + ("length",) * (ndim - 1)
        shape = None if rows is None else (rows,) + (1,) * (ndim - 1)
        return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape))

    return cls(**{f.name: sharding(f.name) for f in dataclasses.fields(cls)})


def make_grpo_update(
    model_config,
    optimizer,
    schedule,
    settings: UpdateSettings,
    *,
    mesh: Mesh,
    state_shardings: dict,
    rules=DEFAULT_RULES,
    rows: int | None = None,
    compiler_options=None,
):
    """Jitted `update(state, batch, rng, ref_params) -> (state, metrics)`; the state is donated.
    `ref_params` is None unless `settings.use_reference`."""
    fn = grpo_update_fn(model_config, optimizer, schedule, settings, sampler.batch_shards(mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    ref_shardings = param_shardings(model_config, mesh, rules) if settings.use_reference else None
    batch = batch_shardings(mesh, rules, rows, packed=bool(settings.pack_tokens), replay=settings.router_replay)
    in_shardings = (state_shardings, batch, replicated, ref_shardings)
    return partitioning.jit_step(
        fn,
        mesh=mesh,
        rules=rules,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, replicated),
        compiler_options=compiler_options,
    )


def update_batch(rollouts, advantages_b: np.ndarray, mask_br: np.ndarray) -> UpdateBatch:
    """The host update batch from a rollout batch: anything with prompt_bt (left-padded), prompt_len_b,
    response_br (right-padded), response_len_b and sampler_logprobs_br, e.g. a `polaris_jax.rollout.Rollouts`.
    `mask_br` (e.g. after overlong filtering) is cut to the real response tokens."""
    prompt_bt, response_br = rollouts.prompt_bt, rollouts.response_br
    p, r = prompt_bt.shape[1], response_br.shape[1]
    prompt_valid_bt = np.arange(p)[None, :] >= p - rollouts.prompt_len_b[:, None]
    response_valid_br = np.arange(r)[None, :] < rollouts.response_len_b[:, None]
    segment_ids_bt = np.concatenate([prompt_valid_bt, response_valid_br], axis=1).astype(np.int32)
    return UpdateBatch(
        tokens_bt=np.concatenate([prompt_bt, response_br], axis=1).astype(np.int32),
        positions_bt=np.maximum(np.cumsum(segment_ids_bt, axis=1) - 1, 0).astype(np.int32),
        segment_ids_bt=segment_ids_bt,
        response_br=response_br.astype(np.int32),
        mask_br=(np.asarray(mask_br) * response_valid_br).astype(np.float32),
        sampler_logprobs_br=rollouts.sampler_logprobs_br.astype(np.float32),
        advantages_b=np.asarray(advantages_b, np.float32),
        routed_experts_btlk=getattr(rollouts, "routed_experts_btlk", None),
    )


def put_update_batch(batch: UpdateBatch, shardings: UpdateBatch) -> UpdateBatch:
    """The whole update batch (every process holds all of it: rollouts are gathered) in its shards."""
    if jax.process_count() == 1:
        return jax.tree.map(jax.device_put, batch, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), batch, shardings)
