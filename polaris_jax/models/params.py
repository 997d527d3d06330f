"""Parameter shapes, logical axis names and initialisation, all derived from one spec table.

Layout (kernels are [in, out]; per-layer tensors are stacked on a leading `layers` axis):
  embed [V, D], final_norm [D], lm_head [D, V] (untied only)
  dense_layers / moe_layers: attn_norm, mlp_norm [D]; q [D, N, H]; k, v [D, K, H]; o [N, H, D];
    q_bias [N, H], k_bias, v_bias [K, H] (qwen2); q_norm, k_norm [H] (qwen3);
    dense: gate, up [D, F], down [F, D];  moe: router [D, E], gate, up [E, D, F], down [E, F, D];
    LoRA: <w>_lora_a [..in, r], <w>_lora_b [r, out..]; on experts Tinker's layout: the hidden-size side is
    one factor shared by every expert, the expert side is per expert (gate/up: a [D, r], b [E, r, F];
    down: a [E, F, r], b [r, D]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # "normal" | "ones" | "zeros" | "lora_a"
    fan_in: int = 1


def _lora_specs(name: str, in_shape, in_axes, out_shape, out_axes, rank, experts: int = 0) -> dict:
    fan_in = int(np.prod(in_shape))
    lead, lead_axes = ((experts,), ("experts",)) if experts else ((), ())
    a_lead, a_axes = ((), ()) if "embed" in in_axes else (lead, lead_axes)  # experts share the hidden side
    b_lead, b_axes = ((), ()) if "embed" in out_axes else (lead, lead_axes)
    return {
        name + "_lora_a": ParamSpec(
            a_lead + tuple(in_shape) + (rank,), a_axes + tuple(in_axes) + (None,), "lora_a", fan_in
        ),
        name + "_lora_b": ParamSpec(b_lead + (rank,) + tuple(out_shape), b_axes + (None,) + tuple(out_axes), "zeros"),
    }


def layer_specs(config, kind: str) -> dict[str, ParamSpec]:
    d, n, kv, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    specs = {
        "attn_norm": ParamSpec((d,), (None,), "ones"),
        "mlp_norm": ParamSpec((d,), (None,), "ones"),
        "q": ParamSpec((d, n, h), ("embed", "heads", "head_dim"), "normal", d),
        "k": ParamSpec((d, kv, h), ("embed", "kv_heads", "head_dim"), "normal", d),
        "v": ParamSpec((d, kv, h), ("embed", "kv_heads", "head_dim"), "normal", d),
        "o": ParamSpec((n, h, d), ("heads", "head_dim", "embed"), "normal", n * h),
    }
    io = {  # name -> (in shape, in axes, out shape, out axes)
        "q": ((d,), ("embed",), (n, h), ("heads", "head_dim")),
        "k": ((d,), ("embed",), (kv, h), ("kv_heads", "head_dim")),
        "v": ((d,), ("embed",), (kv, h), ("kv_heads", "head_dim")),
        "o": ((n, h), ("heads", "head_dim"), (d,), ("embed",)),
    }
    if config.qkv_bias:
        specs.update(
            q_bias=ParamSpec((n, h), ("heads", "head_dim"), "zeros"),
            k_bias=ParamSpec((kv, h), ("kv_heads", "head_dim"), "zeros"),
            v_bias=ParamSpec((kv, h), ("kv_heads", "head_dim"), "zeros"),
        )
    if config.qk_norm:
        specs.update(q_norm=ParamSpec((h,), (None,), "ones"), k_norm=ParamSpec((h,), (None,), "ones"))
    experts = config.num_experts if kind == "moe" else 0
    f = config.moe_intermediate_size if experts else config.intermediate_size
    lead, lead_axes = ((experts,), ("experts",)) if experts else ((), ())
    specs.update(
        gate=ParamSpec(lead + (d, f), lead_axes + ("embed", "mlp"), "normal", d),
        up=ParamSpec(lead + (d, f), lead_axes + ("embed", "mlp"), "normal", d),
        down=ParamSpec(lead + (f, d), lead_axes + ("mlp", "embed"), "normal", f),
    )
    if experts:
        specs["router"] = ParamSpec((d, experts), ("embed", None), "normal", d)
    mlp_io = {
        "gate": ((d,), ("embed",), (f,), ("mlp",)),
        "up": ((d,), ("embed",), (f,), ("mlp",)),
        "down": ((f,), ("mlp",), (d,), ("embed",)),
    }
    if config.lora_rank:
        for name in config.lora_targets:
            if name in io:
                specs.update(_lora_specs(name, *io[name], config.lora_rank))
            elif name in mlp_io:
                specs.update(_lora_specs(name, *mlp_io[name], config.lora_rank, experts))
    return specs


def param_specs(config) -> dict:
    """The full parameter tree as ParamSpec leaves."""
    d, v = config.hidden_size, config.vocab_size
    tree = {"embed": ParamSpec((v, d), ("vocab", "embed"), "normal", 1), "final_norm": ParamSpec((d,), (None,), "ones")}
    if not config.tie_word_embeddings:
        tree["lm_head"] = ParamSpec((d, v), ("embed", "vocab"), "normal", d)
    if config.lora_rank and "lm_head" in config.lora_targets:  # on the unembedding, tied or not
        tree.update(_lora_specs("lm_head", (d,), ("embed",), (v,), ("vocab",), config.lora_rank))
    for kind in ("dense", "moe"):
        count = config.num_layers_of(kind)
        if count:
            tree[kind + "_layers"] = {
                name: dataclasses.replace(spec, shape=(count,) + spec.shape, axes=("layers",) + spec.axes)
                for name, spec in layer_specs(config, kind).items()
            }
    return tree


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], object], config) -> dict:
    return jax.tree.map(fn, param_specs(config), is_leaf=_is_spec)


def param_axes(config) -> dict:
    """Logical axis names for every parameter, in the same tree structure as the params."""
    return map_specs(lambda s: s.axes, config)


def param_shapes(config) -> dict:
    """jax.ShapeDtypeStruct for every parameter (no allocation)."""
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, config.weight_dtype), config)


def init_params(config, rng: jax.Array, std: float = 0.02) -> dict:
    """Random initialisation; LoRA B factors start at zero so adapters begin as the identity."""
    specs, treedef = jax.tree.flatten(param_specs(config), is_leaf=_is_spec)
    keys = jax.random.split(rng, len(specs))
    dtype = config.weight_dtype

    def one(spec: ParamSpec, key):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        scale = std if spec.init == "normal" else spec.fan_in**-0.5
        return (scale * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(specs, keys)])


def is_lora_leaf(path) -> bool:
    return any("_lora_" in str(getattr(p, "key", "")) for p in path)
