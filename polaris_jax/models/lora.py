"""LoRA adapters ("LoRA without regret", Tinker): add, split trainable, merge for export.

Adapters live beside their base weight in the same layer dict (`q_lora_a`, `q_lora_b`, ...), on
attention, MLP and MoE expert projections (Tinker's layout: the hidden-size factor shared by all
experts), and optionally (target "lm_head") on the unembedding as
top-level `lm_head_lora_a/b`. A is random (std 1/sqrt(fan_in)), B is zero, and the
update is scaled by alpha/rank, so a new adapter leaves the model unchanged.

Learning-rate rule: LoRA wants about 10x the full fine-tuning learning rate (Schulman et al.,
"LoRA Without Regret", 2025), roughly independent of rank when alpha is held fixed (alpha=32).
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

from polaris_jax.models.params import init_params, is_lora_leaf, param_shapes


def add_lora(config, params, rng, *, rank: int, alpha: float = 32.0, targets=None):
    """Returns (config with LoRA, params with fresh adapters next to the given base weights)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    new_config = config.replace(
        lora_rank=rank, lora_alpha=float(alpha), lora_targets=tuple(targets or config.lora_targets)
    )
    fresh = init_params(new_config, rng)
    merged = jax.tree.map(lambda x: x, fresh)
    for key, value in params.items():
        if isinstance(value, dict):
            merged[key].update({k: v for k, v in value.items() if "_lora_" not in k})
        else:
            merged[key] = value
    return new_config, merged


def lora_mask(params):
    """A pytree of bools: True on adapter leaves (the trainable set under LoRA)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_lora_leaf(path), params)


def _delta(a, b, w_ndim: int, experts: bool = False):
    if experts:
        a, b = _share_across_experts(a, b, w_ndim)
    lead = a.ndim + b.ndim - w_ndim - 2
    letters = iter(string.ascii_lowercase.replace("r", ""))
    lead_s = "".join(next(letters) for _ in range(lead))
    in_s = "".join(next(letters) for _ in range(a.ndim - lead - 1))
    out_s = "".join(next(letters) for _ in range(b.ndim - lead - 1))
    return jnp.einsum(
        f"{lead_s}{in_s}r,{lead_s}r{out_s}->{lead_s}{in_s}{out_s}", a.astype(jnp.float32), b.astype(jnp.float32)
    )


def _share_across_experts(a, b, w_ndim: int):
    """Tinker's expert LoRA shares one factor across experts: give it the other factor's experts axis."""
    axis = w_ndim - 3  # [..., E, in, out]
    experts = max(a, b, key=lambda f: f.ndim).shape[axis]
    grow = lambda f: jnp.broadcast_to(jnp.expand_dims(f, axis), f.shape[:axis] + (experts,) + f.shape[axis:])
    return (grow(a), b) if a.ndim < b.ndim else (a, grow(b))


def merge_lora(config, params):
    """Folds adapters into base weights: W + (alpha/rank)·A@B. Returns (config without LoRA, params)."""
    scale = config.lora_alpha / config.lora_rank
    out = {}
    for key, value in params.items():
        if "_lora_" in key:
            continue
        if not isinstance(value, dict):
            out[key] = value
            continue
        layer = {k: v for k, v in value.items() if "_lora_" not in k}
        for name in list(layer):
            if name + "_lora_a" in value:
                w = layer[name]
                experts = "router" in value and name in ("gate", "up", "down")
                delta = _delta(value[name + "_lora_a"], value[name + "_lora_b"], w.ndim, experts)
                layer[name] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
        out[key] = layer
    merged_config = config.replace(lora_rank=0, lora_alpha=0.0)
    if "lm_head_lora_a" in params:  # a tied model gets its own (merged) lm_head: it is untied
        w = params["lm_head"] if "lm_head" in params else params["embed"].T
        delta = _delta(params["lm_head_lora_a"], params["lm_head_lora_b"], w.ndim)
        out["lm_head"] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
        merged_config = merged_config.replace(tie_word_embeddings=False)
    return merged_config, out


_EXPERT_TARGETS = ("gate", "up", "down")  # a MoE layer's MLP targets are its experts


def can_stack(config, targets) -> bool:
    """Whether adapters on `targets` can be stacked: not on a MoE model's expert projections (their rows are
    regrouped by expert, away from their adapter)."""
    return not (config.is_moe and any(t in _EXPERT_TARGETS for t in targets))


def stack_adapters(config, adapters: list, *, rank: int, targets) -> dict:
    """The leaves of a multi-LoRA model (models.layers, `forward(adapter_rows_b=...)`): every adapter leaf
    of a rank-`rank` LoRA on `targets`, stacked over `adapters` on the axis after the layers axis.

    adapters: per slot, (alpha / rank, adapter leaves laid out as in the params) or None (a zero slot).
    A smaller rank is padded with zeros and each scale is folded into B, so slot i's delta is adapter i's.
    Targets that `can_stack` refuses raise ValueError."""
    if not can_stack(config, targets):
        raise ValueError(f"targets {tuple(targets)}: multi-LoRA batching does not cover MoE expert adapters")
    shapes = param_shapes(config.replace(lora_rank=rank, lora_alpha=float(rank), lora_targets=tuple(targets)))
    out = {}
    for group, leaf in shapes.items():
        if isinstance(leaf, dict):  # a layer stack: the adapter axis goes after the layers axis
            stacked = {n: _stack(adapters, group, n, s.shape, 1) for n, s in leaf.items() if "_lora_" in n}
            if stacked:
                out[group] = stacked
        elif "_lora_" in group:
            out[group] = _stack(adapters, group, group, leaf.shape, 0)
    return out


def _stack(adapters, group: str, name: str, shape, lead: int):
    return jnp.stack([_slot(a, group, name, shape, lead) for a in adapters], axis=lead)


def _slot(entry, group: str, name: str, shape, lead: int):
    """One slot of a stacked leaf (`shape` includes the layers axis when lead is 1): the adapter's leaf with
    its rank padded and B scaled, or zeros where the slot or the adapter has none."""
    leaves = None if entry is None else entry[1].get(group, {}) if lead else entry[1]
    value = None if leaves is None else leaves.get(name)
    if value is None:
        return jnp.zeros(shape, jnp.float32)
    value = jnp.asarray(value, jnp.float32)
    rank_axis = lead if name.endswith("_lora_b") else value.ndim - 1
    pad = shape[rank_axis] - value.shape[rank_axis]
    if (
        pad < 0
        or value.ndim != len(shape)
        or any(value.shape[i] != shape[i] for i in range(len(shape)) if i != rank_axis)
    ):
        raise ValueError(f"{group}.{name}: shape {value.shape} does not fit the stack's {tuple(shape)}")
    value = jnp.pad(value, [(0, pad if i == rank_axis else 0) for i in range(value.ndim)])
    return value * entry[0] if name.endswith("_lora_b") else value
