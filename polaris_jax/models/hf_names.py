"""The mapping between Hugging Face tensor names/layouts and our parameter tree.

HF linear weights are [out, in]; ours are [in, out] with heads split out. MoE experts are read from
either the Hub's per-expert layout (`mlp.experts.{e}.gate_proj.weight`) or transformers 5's fused
one (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]); export writes the
per-expert layout, which every transformers version loads.
"""

from __future__ import annotations

import numpy as np

from polaris_jax.models.sharding import to_host

_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_NORMS = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _heads(config, name: str) -> int:
    return config.num_heads if name in ("q", "o") else config.num_kv_heads


def _checked(reader, name: str, shape: tuple[int, ...]) -> np.ndarray:
    found = reader.shape(name)
    if tuple(found) != tuple(shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(found)}, expected {tuple(shape)} from config.json")
    return reader.get(name)


def read_top_tensor(config, reader, name: str) -> np.ndarray:
    d, v = config.hidden_size, config.vocab_size
    if name == "embed":
        return _checked(reader, "model.embed_tokens.weight", (v, d))
    if name == "final_norm":
        return _checked(reader, "model.norm.weight", (d,))
    if name == "lm_head":
        return _checked(reader, "lm_head.weight", (v, d)).T
    raise KeyError(name)


def _read_expert(config, reader, prefix: str, name: str) -> np.ndarray:
    """[E, in, out] for gate/up/down of one MoE layer."""
    e, d, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
    fused = prefix + "mlp.experts.gate_up_proj"
    if name in ("gate", "up") and fused in reader:
        both = _checked(reader, fused, (e, 2 * f, d))
        part = both[:, :f] if name == "gate" else both[:, f:]
        return np.transpose(part, (0, 2, 1))
    if name == "down" and prefix + "mlp.experts.down_proj" in reader:
        return np.transpose(_checked(reader, prefix + "mlp.experts.down_proj", (e, d, f)), (0, 2, 1))
    shape = (d, f) if name == "down" else (f, d)
    return np.stack([_checked(reader, f"{prefix}mlp.experts.{i}.{_MLP[name]}.weight", shape).T for i in range(e)])


def read_layer_tensor(config, reader, layer: int, kind: str, name: str) -> np.ndarray:
    """One layer's parameter `name`, in our layout."""
    prefix = f"model.layers.{layer}."
    d, h = config.hidden_size, config.head_dim
    if name in _NORMS:
        return _checked(reader, prefix + _NORMS[name], (h,) if name in ("q_norm", "k_norm") else (d,))
    if name in _ATTN:
        n = _heads(config, name)
        if name == "o":
            return _checked(reader, prefix + _ATTN[name] + ".weight", (d, n * h)).T.reshape(n, h, d)
        return _checked(reader, prefix + _ATTN[name] + ".weight", (n * h, d)).T.reshape(d, n, h)
    if name.endswith("_bias"):
        base = name[: -len("_bias")]
        n = _heads(config, base)
        return _checked(reader, prefix + _ATTN[base] + ".bias", (n * h,)).reshape(n, h)
    if name == "router":
        return _checked(reader, prefix + "mlp.gate.weight", (config.num_experts, d)).T
    if kind == "moe":
        return _read_expert(config, reader, prefix, name)
    f = config.intermediate_size
    shape = (d, f) if name == "down" else (f, d)
    return _checked(reader, prefix + f"mlp.{_MLP[name]}.weight", shape).T


def _layer_names(config, layer: int) -> list[tuple[str, str, tuple]]:
    """[(hf name, our name, hf shape)] for one layer; experts expand to one entry each."""
    prefix = f"model.layers.{layer}."
    d, h, n = config.hidden_size, config.head_dim, config.num_heads
    out = [(prefix + _NORMS["attn_norm"], "attn_norm", (d,)), (prefix + _NORMS["mlp_norm"], "mlp_norm", (d,))]
    out += [(prefix + _ATTN[x] + ".weight", x, (_heads(config, x) * h, d)) for x in ("q", "k", "v")]
    out.append((prefix + _ATTN["o"] + ".weight", "o", (d, n * h)))
    if config.qkv_bias:
        out += [(prefix + _ATTN[x] + ".bias", x + "_bias", (_heads(config, x) * h,)) for x in ("q", "k", "v")]
    if config.qk_norm:
        out += [(prefix + _NORMS[x], x, (h,)) for x in ("q_norm", "k_norm")]
    if config.layer_is_moe(layer):
        f = config.moe_intermediate_size
        out.append((prefix + "mlp.gate.weight", "router", (config.num_experts, d)))
        for e in range(config.num_experts):
            for x in ("gate", "up", "down"):
                out.append((f"{prefix}mlp.experts.{e}.{_MLP[x]}.weight", f"{x}@{e}", (d, f) if x == "down" else (f, d)))
    else:
        f = config.intermediate_size
        out += [(prefix + f"mlp.{_MLP[x]}.weight", x, (d, f) if x == "down" else (f, d)) for x in _MLP]
    return out


def check_checkpoint(config, reader) -> None:
    """Fails with the first missing tensor's name before any weight is read."""
    for name, _ in export_names(config):
        if name in reader:
            continue
        if ".mlp.experts." in name:  # fused layout is fine too
            prefix = name.split("mlp.experts.")[0]
            if prefix + "mlp.experts.gate_up_proj" in reader and prefix + "mlp.experts.down_proj" in reader:
                continue
        raise KeyError(f"checkpoint {reader.directory} is missing tensor {name!r}")


def export_names(config) -> list[tuple[str, tuple]]:
    names = [("model.embed_tokens.weight", (config.vocab_size, config.hidden_size))]
    for layer in range(config.num_layers):
        names += [(hf, shape) for hf, _, shape in _layer_names(config, layer)]
    names.append(("model.norm.weight", (config.hidden_size,)))
    if not config.tie_word_embeddings:
        names.append(("lm_head.weight", (config.vocab_size, config.hidden_size)))
    return names


def stack_index(config, layer: int) -> tuple[str, int]:
    kind = "moe" if config.layer_is_moe(layer) else "dense"
    return kind, sum(1 for i in range(layer) if config.layer_is_moe(i) == (kind == "moe"))


def export_tensor(config, params, hf_name: str) -> np.ndarray:
    """Fetches one HF tensor from (possibly sharded) params, converted to the HF layout."""
    if hf_name == "model.embed_tokens.weight":
        return to_host(params["embed"])
    if hf_name == "model.norm.weight":
        return to_host(params["final_norm"])
    if hf_name == "lm_head.weight":
        return to_host(params["lm_head"]).T.copy()
    layer = int(hf_name.split(".")[2])
    ours = {hf: name for hf, name, _ in _layer_names(config, layer)}[hf_name]
    kind, j = stack_index(config, layer)
    stack = params[kind + "_layers"]
    if "@" in ours:
        name, expert = ours.split("@")
        return to_host(stack[name][j, int(expert)]).T.copy()
    w = to_host(stack[ours][j])
    if ours in _ATTN:
        return (w.reshape(-1, w.shape[-1]) if ours == "o" else w.reshape(w.shape[0], -1)).T.copy()
    if ours.endswith("_bias"):
        return w.reshape(-1)
    if ours in _MLP or ours == "router":
        return w.T.copy()
    return w
