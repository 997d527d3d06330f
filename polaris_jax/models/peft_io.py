"""LoRA adapters as PEFT writes them: `adapter_config.json` + `adapter_model.safetensors`, loadable with
`peft.PeftModel.from_pretrained` over the transformers model of `save_hf(base)`, and back into our tree.

Layout (PEFT 0.17+; torch linear weights are [out, in]):
- attention and dense MLP projections are `target_modules` (`q_proj`, ..., `down_proj`, `lm_head`):
  `<module>.lora_A.weight` [r, in], `<module>.lora_B.weight` [out, r].
- routed experts are `target_parameters` on transformers 5's 3-D expert tensors: `mlp.experts.gate_up_proj`
  [E, 2F, D] and `mlp.experts.down_proj` [E, D, F]. PEFT wraps each parameter (gate_up_proj innermost: with
  both, its keys read `mlp.experts.base_layer.lora_*`, down_proj's `mlp.experts.lora_*`) with lora_A [r·E, in] (rows
  expert-major: A.reshape(E, r, in)) and lora_B [out, r·E] (columns expert-minor: B.reshape(out, r, E)),
  delta[e] = B[:, :, e] @ A[e] · alpha / r.
- Our experts' LoRA is Tinker's (models/params.py): gate and up each share one hidden-size factor across
  experts and keep a per-expert factor, down the reverse. gate and up fuse into gate_up_proj at rank 2r
  (A = both shared factors stacked, B block-diagonal per expert; `rank_pattern` / `alpha_pattern` keep the
  scale alpha / r); down exports at rank r with its shared factor repeated per expert. Loading takes an
  adapter of this structure back (it checks the shared factors and the zero blocks, and names what
  differs); a PEFT adapter trained with per-expert hidden-size factors does not fit our layout and is refused.
"""

from __future__ import annotations

import json
import os

import numpy as np

from polaris_jax.files import atomic_directory
from polaris_jax.models import hf_names
from polaris_jax.models.config import UNEMBED_TARGET, ConfigError
from polaris_jax.models.params import param_shapes
from polaris_jax.models.safetensors_io import SafetensorsFile, write_safetensors
from polaris_jax.models.sharding import to_host

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_PREFIX = "base_model.model."
_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_MODULES.update(gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")


def _expert_keys(config) -> tuple[str, str]:
    """Keys (with a `{}` for A / B) of the gate_up_proj and down_proj adapters: PEFT nests one wrapper per
    targeted parameter, the last listed outermost, so gate_up_proj sits under `base_layer` only when
    down_proj is targeted too."""
    inner = "base_layer." if "down" in config.lora_targets else ""
    return f"mlp.experts.{inner}lora_{{}}.weight", "mlp.experts.lora_{}.weight"


def _dense_factors(config, a, b) -> tuple[np.ndarray, np.ndarray]:
    """Our (a [..in, r], b [r, out..]) of one projection -> PEFT's (A [r, in], B [out, r])."""
    r = config.lora_rank
    return a.reshape(-1, r).T.copy(), b.reshape(r, -1).T.copy()


def _expert_factors(config, stack: dict, j: int) -> dict[str, np.ndarray]:
    """One MoE layer's expert LoRA in PEFT's target_parameters layout (see the module docstring)."""
    gate_up_key, down_key = _expert_keys(config)
    e, r = config.num_experts, config.lora_rank
    f, d = config.moe_intermediate_size, config.hidden_size
    get = lambda name: stack[name][j]
    out = {}
    if {"gate", "up"} & set(config.lora_targets):
        a_rd = np.zeros((2 * r, d), np.float32)
        b_erf = np.zeros((e, 2 * f, 2 * r), np.float32)  # [E, out, r'] before PEFT's column order
        for half, name in enumerate(("gate", "up")):
            if name in config.lora_targets:
                a_rd[half * r : (half + 1) * r] = get(name + "_lora_a").T  # [D, r] shared
                b_erf[:, half * f : (half + 1) * f, half * r : (half + 1) * r] = np.transpose(
                    get(name + "_lora_b"), (0, 2, 1)
                )
        out[gate_up_key.format("A")] = np.tile(a_rd[None], (e, 1, 1)).reshape(e * 2 * r, d)
        out[gate_up_key.format("B")] = np.transpose(b_erf, (1, 2, 0)).reshape(2 * f, 2 * r * e)
    if "down" in config.lora_targets:
        a_efr = get("down_lora_a")  # [E, F, r] per expert
        b_rd = get("down_lora_b")  # [r, D] shared
        out[down_key.format("A")] = np.transpose(a_efr, (0, 2, 1)).reshape(e * r, f)
        out[down_key.format("B")] = np.repeat(b_rd.T[:, :, None], e, axis=2).reshape(d, r * e)
    return out


def adapter_tensors(config, params) -> dict[str, np.ndarray]:
    """PEFT-named tensors of every adapter in `params` (float32)."""
    if not config.lora_rank:
        raise ConfigError("the model carries no LoRA adapters (lora_rank=0)")
    params = {  # the adapters on the host, each fetched once (a slice per layer would compile per shape)
        k: {n: to_host(w) for n, w in v.items() if "_lora_" in n} if isinstance(v, dict) else to_host(v)
        for k, v in params.items()
        if isinstance(v, dict) or "_lora_" in k
    }
    tensors = {}
    for layer in range(config.num_layers):
        kind, j = hf_names.stack_index(config, layer)
        stack, prefix = params[kind + "_layers"], f"{_PREFIX}model.layers.{layer}."
        for name in config.lora_targets:
            if name == UNEMBED_TARGET or (kind == "moe" and name in ("gate", "up", "down")):
                continue
            a, b = _dense_factors(config, stack[name + "_lora_a"][j], stack[name + "_lora_b"][j])
            key = f"{prefix}{_MODULES[name]}.lora_"
            tensors[key + "A.weight"], tensors[key + "B.weight"] = a, b
        if kind == "moe":
            tensors.update({prefix + k: v for k, v in _expert_factors(config, stack, j).items()})
    if UNEMBED_TARGET in config.lora_targets:
        a, b = _dense_factors(config, params["lm_head_lora_a"], params["lm_head_lora_b"])
        tensors[f"{_PREFIX}lm_head.lora_A.weight"], tensors[f"{_PREFIX}lm_head.lora_B.weight"] = a, b
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def adapter_config(config, base_model_name_or_path: str = "") -> dict:
    """PEFT's LoraConfig for `adapter_tensors(config, ...)`."""
    moe_mlp = config.is_moe
    mlp_targets = [t for t in ("gate", "up", "down") if t in config.lora_targets]
    if moe_mlp and mlp_targets and not all(config.layer_is_moe(i) for i in range(config.num_layers)):
        raise ConfigError(
            "PEFT turns every gate_proj/up_proj/down_proj target of a qwen3_moe model into its fused experts, so "
            "LoRA on this model's dense MLP layers (mlp_only_layers / decoder_sparse_step) has no PEFT form"
        )
    modules = [_MODULES[t].split(".")[-1] for t in ("q", "k", "v", "o") if t in config.lora_targets]
    if not moe_mlp:
        modules += [_MODULES[t].split(".")[-1] for t in mlp_targets]
    if UNEMBED_TARGET in config.lora_targets:
        modules.append(UNEMBED_TARGET)
    parameters = []
    if moe_mlp and {"gate", "up"} & set(mlp_targets):
        parameters.append("mlp.experts.gate_up_proj")
    if moe_mlp and "down" in mlp_targets:
        parameters.append("mlp.experts.down_proj")
    fused = {"gate_up_proj": 2 * config.lora_rank} if "mlp.experts.gate_up_proj" in parameters else {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "target_modules": modules,
        "target_parameters": parameters,
        "rank_pattern": fused,
        "alpha_pattern": {k: 2 * config.lora_alpha for k in fused},  # rank 2r at the same alpha / r
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }


def save_peft(config, params, path, *, base_model_name_or_path: str = "", overwrite: bool = False) -> str:
    """Writes `params`' adapters as a PEFT adapter directory (atomically: a temp directory renamed into place).
    An existing non-empty `path` is kept unless `overwrite`."""
    peft_config = adapter_config(config, base_model_name_or_path)  # refuses what PEFT cannot hold, first
    tensors = adapter_tensors(config, params)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_safetensors(os.path.join(tmp, "adapter_model.safetensors"), tensors, {"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(peft_config, f, indent=2)
    return os.path.abspath(os.fspath(path))


def _shared(stacked: np.ndarray, what: str) -> np.ndarray:
    """stacked[0] when every expert's copy equals it, else a ConfigError naming `what`."""
    if not np.allclose(stacked, stacked[:1], rtol=0, atol=1e-6 * (np.abs(stacked).max() + 1e-30)):
        raise ConfigError(f"{what} differs between experts; polaris_jax shares it across experts (Tinker's layout)")
    return stacked[0]


def load_peft(config, params, path) -> tuple[object, dict]:
    """(config with LoRA, `params` with the adapters of the PEFT directory `path` beside the base weights),
    for the engine or `save_hf` (which merges them). Missing files, tensors or a structure our layout cannot
    hold are errors naming them."""
    for name in ADAPTER_FILES:
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{path} is not a PEFT adapter directory: {name} is missing")
    with open(os.path.join(path, "adapter_config.json")) as f:
        peft = json.load(f)
    if peft.get("peft_type") != "LORA" or peft.get("use_rslora") or peft.get("use_dora"):
        raise ConfigError(f"{path}: only plain LoRA adapters load (peft_type LORA, no rsLoRA or DoRA)")
    rank, alpha = int(peft["r"]), float(peft["lora_alpha"])
    targets = [t for t, m in _MODULES.items() if m.split(".")[-1] in peft.get("target_modules", [])]
    if "lm_head" in peft.get("target_modules", []):
        targets.append(UNEMBED_TARGET)
    parameters = peft.get("target_parameters", [])
    if "mlp.experts.gate_up_proj" in parameters:
        targets += [t for t in ("gate", "up") if t not in targets]
    if "mlp.experts.down_proj" in parameters:
        targets += ["down"] if "down" not in targets else []
    lora_config = config.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets))
    file = SafetensorsFile(os.path.join(path, "adapter_model.safetensors"))
    tensor = lambda key: _tensor(file, key, path)
    fills: dict[str, dict[str, tuple[list, list]]] = {}
    for layer in range(config.num_layers):
        kind, j = hf_names.stack_index(config, layer)
        prefix = f"{_PREFIX}model.layers.{layer}."
        for name in targets:
            if name == UNEMBED_TARGET or (kind == "moe" and name in ("gate", "up", "down")):
                continue
            a = tensor(f"{prefix}{_MODULES[name]}.lora_A.weight").T
            b = tensor(f"{prefix}{_MODULES[name]}.lora_B.weight").T
            _put(fills, kind, name, j, a, b)
        if kind == "moe":
            for name, (a, b) in _expert_from_peft(lora_config, tensor, prefix, f"layer {layer}").items():
                _put(fills, kind, name, j, a, b)
    shapes = param_shapes(lora_config)
    out = {
        k: ({n: w for n, w in v.items() if "_lora_" not in n} if isinstance(v, dict) else v) for k, v in params.items()
    }
    out = {k: v for k, v in out.items() if "_lora_" not in k}
    for kind, names in fills.items():
        stack, want = out[kind + "_layers"], shapes[kind + "_layers"]
        for name, (a_list, b_list) in names.items():
            for side, arrays in (("_lora_a", a_list), ("_lora_b", b_list)):
                shape = want[name + side].shape
                stacked = np.stack(arrays).astype(np.float32)
                if stacked.size != int(np.prod(shape)):
                    raise ConfigError(f"{path}: {kind} {name}{side} holds {stacked.shape}, expected {shape}")
                stack[name + side] = stacked.reshape(shape)
    if UNEMBED_TARGET in targets:
        out["lm_head_lora_a"] = tensor(f"{_PREFIX}lm_head.lora_A.weight").T.copy()
        out["lm_head_lora_b"] = tensor(f"{_PREFIX}lm_head.lora_B.weight").T.copy()
    return lora_config, out


def _put(fills, kind, name, j, a, b) -> None:
    a_list, b_list = fills.setdefault(kind, {}).setdefault(name, ([], []))
    assert len(a_list) == j, "layers are visited in order"
    a_list.append(a)
    b_list.append(b)


def _tensor(file, key: str, path: str) -> np.ndarray:
    if key not in file.keys():
        raise KeyError(f"PEFT adapter {path} is missing tensor {key!r}")
    return np.asarray(file.get(key), np.float32)


def _expert_from_peft(config, tensor, prefix: str, where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Our (a, b) per expert target from PEFT's 3-D expert LoRA of one layer (the inverse of `_expert_factors`)."""
    gate_up_key, down_key = _expert_keys(config)
    e, r = config.num_experts, config.lora_rank
    f, d = config.moe_intermediate_size, config.hidden_size
    out = {}
    if {"gate", "up"} & set(config.lora_targets):
        fused_a = tensor(prefix + gate_up_key.format("A"))
        if fused_a.shape != (e * 2 * r, d):
            raise ConfigError(
                f"{where} gate_up_proj lora_A is {fused_a.shape}, expected {(e * 2 * r, d)} (rank 2r: rank_pattern)"
            )
        a_erd = fused_a.reshape(e, 2 * r, d)
        b_erf = np.transpose(
            tensor(prefix + gate_up_key.format("B")).reshape(2 * f, 2 * r, e), (2, 0, 1)
        )  # [E, 2F, 2r]
        shared_a = _shared(a_erd, f"{where} gate_up_proj lora_A")
        if np.abs(b_erf[:, :f, r:]).max(initial=0) > 0 or np.abs(b_erf[:, f:, :r]).max(initial=0) > 0:
            raise ConfigError(f"{where} gate_up_proj lora_B mixes gate and up ranks; ours keeps them apart")
        for half, name in enumerate(("gate", "up")):
            rows, cols = slice(half * f, (half + 1) * f), slice(half * r, (half + 1) * r)
            out[name] = (shared_a[cols].T.copy(), np.transpose(b_erf[:, rows, cols], (0, 2, 1)).copy())
    if "down" in config.lora_targets:
        a_erf = tensor(prefix + down_key.format("A")).reshape(e, r, f)
        b_dre = tensor(prefix + down_key.format("B")).reshape(d, r, e)
        shared_b = _shared(np.transpose(b_dre, (2, 0, 1)), f"{where} down_proj lora_B")  # [D, r]
        out["down"] = (np.transpose(a_erf, (0, 2, 1)).copy(), shared_b.T.copy())
    return out
