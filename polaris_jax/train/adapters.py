"""LoRA adapters trained over one frozen base model, many at once: Tinker's forward_backward and optim_step.

An adapter is a dict shaped like the params but holding only `<w>_lora_a` / `<w>_lora_b` leaves; the
base weights are shared by every adapter and never copied (`with_adapter` lays the adapter beside them).
Its rank, alpha and targets are an `AdapterSpec`, so two adapters of equal spec share compiled programs.

    spec = AdapterSpec(rank=8, seed=0)
    adapter = init_adapter(base_config, spec)
    out = forward_backward(spec.model_config(base_config), "cross_entropy", base_params, adapter, batch, loss_cfg)
    grads = add_grads(grads, out["grads"])        # gradients accumulate until the optimizer step
    # several clients' adapters in one call, each row training its own:
    out = forward_backward(base_config, name, base_params, (a1, a2), batch | {"adapter_rows_b": rows_b}, cfg,
                           stack=Stack.of([spec1, spec2]))
    adapter, opt_state, norm = adam_step(adapter, opt_state, grads, adam_hyper(...))

Batches are padded (`pad_batch`) to a few shapes, so a run compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from polaris_jax.models.config import UNEMBED_TARGET
from polaris_jax.models.lora import stack_adapters
from polaris_jax.models.params import map_specs
from polaris_jax.models.transformer import forward as forward_model
from polaris_jax.train.losses import token_stats
from polaris_jax.train.token_losses import TOKEN_LOSSES

ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    rank: int = 32
    seed: int = 0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = False
    alpha: float = 32.0

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 1024:
            raise ValueError(f"rank: {self.rank!r} must be an integer in [1, 1024]")
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise ValueError("train_attn, train_mlp, train_unembed: at least one must be true (nothing would train)")

    @property
    def targets(self) -> tuple[str, ...]:
        layers = (ATTENTION_TARGETS if self.train_attn else ()) + (MLP_TARGETS if self.train_mlp else ())
        return layers + ((UNEMBED_TARGET,) if self.train_unembed else ())

    def model_config(self, base_config):
        return base_config.replace(lora_rank=self.rank, lora_alpha=self.alpha, lora_targets=self.targets)


def init_adapter(base_config, spec: AdapterSpec) -> dict:
    """Fresh float32 adapter leaves: A ~ N(0, 1/fan_in), B = 0 (the model is unchanged)."""
    specs = map_specs(lambda s: s, spec.model_config(base_config))
    leaves = [((g, n), s) for g, group in specs.items() if isinstance(group, dict) for n, s in sorted(group.items())]
    leaves += [((n,), s) for n, s in sorted(specs.items()) if not isinstance(s, dict)]
    adapter, key = {}, jax.random.key(spec.seed)
    for path, s in leaves:
        if "_lora_" not in path[-1]:
            continue
        key, sub = jax.random.split(key)
        value = (
            jnp.zeros(s.shape, jnp.float32)
            if s.init == "zeros"
            else s.fan_in**-0.5 * jax.random.normal(sub, s.shape, jnp.float32)
        )
        if len(path) == 2:
            adapter.setdefault(path[0], {})[path[1]] = value
        else:
            adapter[path[0]] = value
    return adapter


def with_adapter(base_params: dict, adapter: dict) -> dict:
    """The full params: base weights with the adapter's leaves beside them (no copy of the base)."""
    params = {k: {**v, **adapter.get(k, {})} if isinstance(v, dict) else v for k, v in base_params.items()}
    params.update({k: v for k, v in adapter.items() if not isinstance(v, dict)})  # lm_head_lora_a/b
    return params


def _bucket(n: int, small: int) -> int:
    """n rounded up to a multiple of `small` up to 8·small, then to a power of two."""
    if n <= 8 * small:
        return -(-n // small) * small
    return 1 << (n - 1).bit_length()


def pad_batch(datums: list[dict], keys: tuple[str, ...], fills: dict) -> dict:
    """Stacks per-datum arrays (tokens, target_tokens and `keys`, each [T_i]) into padded [B, T] arrays,
    plus positions_bt, segment_ids_bt and mask_bt (1 on real positions)."""
    lengths = [len(d["tokens"]) for d in datums]
    b, t = _bucket(len(datums), 1 if len(datums) < 8 else 8), _bucket(max(lengths), 32)
    out = {
        "tokens_bt": np.zeros((b, t), np.int32),
        "targets_bt": np.zeros((b, t), np.int32),
        "mask_bt": np.zeros((b, t), np.float32),
        **{k: np.zeros((b, t), np.float32) for k in keys},
    }
    for i, (d, n) in enumerate(zip(datums, lengths)):
        out["tokens_bt"][i, :n] = d["tokens"]
        out["targets_bt"][i, :n] = d["target_tokens"]
        out["mask_bt"][i, :n] = 1.0
        for k in keys:
            out[k][i, :n] = d[k] if k in d else fills[k]
    out["positions_bt"] = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    out["segment_ids_bt"] = out["mask_bt"].astype(np.int32)
    return out


@dataclasses.dataclass(frozen=True)
class Stack:
    """Several adapters in one call (multi-LoRA): per adapter its scale (alpha / rank), and the stack's
    rank and targets (the largest and the union; `models.lora.stack_adapters`)."""

    scales: tuple[float, ...]
    rank: int
    targets: tuple[str, ...]

    @classmethod
    def of(cls, specs) -> Stack:
        targets = tuple(dict.fromkeys(t for s in specs for t in s.targets))
        return cls(tuple(s.alpha / s.rank for s in specs), max(s.rank for s in specs), targets)


def _loss_and_logprobs(config, loss_name, base_params, adapter, batch, loss_cfg, stack):
    if stack is None:
        params, rows_b = with_adapter(base_params, adapter), None
    else:  # row b trains adapter batch["adapter_rows_b"][b]; the gradient reaches only that adapter
        leaves = stack_adapters(config, list(zip(stack.scales, adapter)), rank=stack.rank, targets=stack.targets)
        params, rows_b = with_adapter(base_params, leaves), batch["adapter_rows_b"]
    stats = token_stats(
        config,
        params,
        batch["tokens_bt"],
        batch["positions_bt"],
        batch["segment_ids_bt"],
        batch["targets_bt"],
        adapter_rows_b=rows_b,
    )
    lp_bt = stats["logprobs"] * batch["mask_bt"]
    loss_b = (TOKEN_LOSSES[loss_name].fn(lp_bt, batch, loss_cfg) * batch["mask_bt"]).sum(axis=1)
    return loss_b.sum(), (lp_bt, loss_b)


@functools.partial(jax.jit, static_argnames=("config", "loss_name", "stack"))
def forward(config, loss_name, base_params, adapter, batch, loss_cfg, stack: Stack | None = None):
    """{loss, loss_b, logprobs_bt}: the summed and per-row loss and per-token logprobs, no gradient.

    One adapter (`config` carries its LoRA fields), or with `stack` a tuple of adapters over the base
    config, row b using adapter batch["adapter_rows_b"][b]."""
    loss, (lp_bt, loss_b) = _loss_and_logprobs(config, loss_name, base_params, adapter, batch, loss_cfg, stack)
    return {"loss": loss, "loss_b": loss_b, "logprobs_bt": lp_bt}


@functools.partial(jax.jit, static_argnames=("config", "loss_name", "stack"))
def forward_backward(config, loss_name, base_params, adapter, batch, loss_cfg, stack: Stack | None = None):
    """`forward`'s outputs and `grads`: the summed loss's gradients with respect to the adapter (with
    `stack`, a tuple: each adapter's gradient from its own rows)."""
    (loss, (lp_bt, loss_b)), grads = jax.value_and_grad(_loss_and_logprobs, argnums=3, has_aux=True)(
        config, loss_name, base_params, adapter, batch, loss_cfg, stack
    )
    return {"loss": loss, "loss_b": loss_b, "logprobs_bt": lp_bt, "grads": grads}


@jax.jit
def add_grads(total, new):
    return jax.tree.map(jnp.add, total, new)


ADAM_DEFAULTS = {
    "learning_rate": 1e-4,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-12,
    "weight_decay": 0.0,
    "grad_clip_norm": 0.0,
}


def adam_hyper(params: dict) -> dict:
    """Tinker's AdamParams (defaults filled) as float32 scalars; raises ValueError naming a bad field."""
    unknown = set(params) - set(ADAM_DEFAULTS)
    if unknown:
        raise ValueError(f"adam_params: unknown fields {sorted(unknown)}")
    merged = {**ADAM_DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    for name, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"adam_params.{name}: {value!r} is not a finite number")
        low_ok = value > 0 if name in ("learning_rate", "eps") else value >= 0
        if not low_ok or (name in ("beta1", "beta2") and value >= 1):
            raise ValueError(f"adam_params.{name}: {value!r} is out of range")
    return {k: jnp.float32(v) for k, v in merged.items()}


_adamw = optax.inject_hyperparams(optax.adamw)


def init_opt_state(adapter: dict):
    h = adam_hyper({})
    return _adamw(learning_rate=h["learning_rate"], b1=h["beta1"], b2=h["beta2"], eps=h["eps"], weight_decay=0.0).init(
        adapter
    )


@functools.partial(jax.jit, donate_argnums=(0, 1))
def adam_step(adapter, opt_state, grads, hyper):
    """One AdamW step (decoupled weight decay, scaled by the learning rate as in optax and torch) after
    clipping the gradients' global norm to grad_clip_norm (0: no clip). Returns (adapter, opt_state, norm)."""
    norm = optax.tree.norm(grads)
    clip = hyper["grad_clip_norm"]
    scale = jnp.where((clip > 0) & (norm > clip), clip / jnp.maximum(norm, 1e-30), 1.0)
    grads = jax.tree.map(lambda g: g * scale, grads)
    opt_state.hyperparams.update(
        learning_rate=hyper["learning_rate"],
        b1=hyper["beta1"],
        b2=hyper["beta2"],
        eps=hyper["eps"],
        weight_decay=hyper["weight_decay"],
    )
    tx = _adamw(learning_rate=0.0, b1=0.0, b2=0.0, eps=0.0, weight_decay=0.0)  # reads the injected values
    updates, opt_state = tx.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, norm


@functools.partial(jax.jit, static_argnames=("config", "k"))
def prompt_logprobs(config, base_params, adapter, tokens_bt, mask_bt, *, k: int):
    """Each prompt token's logprob given the tokens before it ([B, T-1]), and the top-k next-token
    (ids, logprobs) at each position ([B, T, k]; k=0 gives empty arrays)."""
    t = tokens_bt.shape[1]
    positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_bt.shape)
    params = with_adapter(base_params, adapter)
    logits_btv, _ = forward_model(config, params, tokens_bt, positions_bt, segment_ids_bt=mask_bt.astype(jnp.int32))
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    lp_bt = jnp.take_along_axis(logp_btv[:, :-1], tokens_bt[:, 1:, None], axis=-1)[..., 0]
    top_lp_btk, top_ids_btk = jax.lax.top_k(logp_btv, k) if k else (logp_btv[..., :0], tokens_bt[..., None][..., :0])
    return lp_bt, top_ids_btk, top_lp_btk
