"""LoRA adapters in PEFT's format, checked against PEFT itself: our exported adapter, loaded with
`peft.PeftModel.from_pretrained` over transformers' model of our base export, gives our logits (attention,
a dense MLP layer, and routed experts as PEFT's 3-D `target_parameters`); reading it back gives the same
params, which `save_hf` merges into a checkpoint transformers loads alone."""

import functools
import json

import jax
import numpy as np
import pytest

from polaris_jax.models import ModelConfig, add_lora, init_params, logits, save_hf
from polaris_jax.models.config import ConfigError
from polaris_jax.models.peft_io import load_peft, save_peft

IDS = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [0, 0, 2, 7, 1, 8, 2, 8]], np.int32)
MASK = np.array([[1] * 8, [0, 0] + [1] * 6], np.int32)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@functools.cache  # shared by the tests (they only read it)
def _model(arch="qwen3_moe", targets=TARGETS, unembed=False):
    extra = dict(num_experts=4, num_experts_per_tok=2) if arch == "qwen3_moe" else {}
    config = ModelConfig.tiny(arch, num_layers=3, **extra)
    targets = targets + (("lm_head",) if unembed else ())
    add = lambda key: add_lora(config, init_params(config, key, std=0.2), key, rank=4, alpha=8.0, targets=targets)
    lora_config = config.replace(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    params = jax.device_get(jax.jit(lambda key: add(key)[1])(jax.random.key(0)))  # one compile, not one per op
    base = {
        k: ({n: w for n, w in v.items() if "_lora_" not in n} if isinstance(v, dict) else v) for k, v in params.items()
    }
    noise = np.random.default_rng(2)  # non-zero B, so every adapter moves the logits
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * noise.standard_normal(x.shape).astype(x.dtype) if "_lora_b" in str(p) else x, params
    )
    return config, base, lora_config, params


@pytest.mark.parametrize(
    "arch,targets,unembed",
    [
        pytest.param("qwen3_moe", TARGETS, False, marks=pytest.mark.slow),  # every case ~20 s: the slow tier
        pytest.param("qwen3_moe", ("q", "o", "up"), True, marks=pytest.mark.slow),  # up alone: gate's half zero
        pytest.param("qwen3_moe", ("down",), False, marks=pytest.mark.slow),
        pytest.param("qwen3", TARGETS, False, marks=pytest.mark.slow),
    ],
)
def test_peft_loads_our_adapter_with_our_logits(arch, targets, unembed, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tests.models.hf_factory import hf_logits

    config, base, lora_config, params = _model(arch, targets, unembed)
    save_hf(config, base, tmp_path / "base")
    save_peft(lora_config, params, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    ours = np.asarray(logits(lora_config, params, IDS, MASK))
    base_logits = np.asarray(logits(config, base, IDS, MASK))
    real = MASK.astype(bool)
    assert np.abs(ours - base_logits)[real].max() > 1e-2  # the adapters matter
    assert np.abs(hf_logits(model, IDS, MASK) - ours)[real].max() <= 1e-4

    loaded_config, loaded = load_peft(config, base, tmp_path / "adapter")
    # PEFT fuses gate and up, so either alone comes back as both (the other's factor zero: the same model).
    assert loaded_config.lora_rank == 4 and set(lora_config.lora_targets) <= set(loaded_config.lora_targets)
    np.testing.assert_allclose(np.asarray(logits(loaded_config, loaded, IDS, MASK)), ours, atol=1e-5)
    if arch == "qwen3_moe" and not unembed:  # the engine samples from the loaded adapter as from ours
        from polaris_jax.sampling import Engine, EngineSettings, Request

        settings = EngineSettings(max_slots=2, num_pages=16, page_size=8, max_seq_len=32, prefill_chunk=8)
        greedy = lambda c, p: Engine(c, p, settings).run([Request([3, 1, 4, 1, 5], 8, temperature=0.0)])[0][0].tokens
        assert greedy(loaded_config, loaded) == greedy(lora_config, params)
    save_hf(loaded_config, loaded, tmp_path / "merged")  # merged: transformers alone, no PEFT
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(hf_logits(merged, IDS, MASK) - ours)[real].max() <= 1e-4


def test_expert_tensors_are_peft_3d_target_parameters(tmp_path):
    _, _, lora_config, params = _model("qwen3_moe", TARGETS, False)
    save_peft(lora_config, params, tmp_path / "adapter")
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["rank_pattern"] == {"gate_up_proj": 8} and config["alpha_pattern"] == {"gate_up_proj": 16.0}


def test_bad_adapters_are_refused_naming_the_problem(tmp_path):
    from polaris_jax.models.safetensors_io import SafetensorsFile, write_safetensors

    config, base, lora_config, params = _model("qwen3_moe", TARGETS, False)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_peft(config, base, tmp_path)
    path = save_peft(lora_config, params, tmp_path / "adapter")
    file = SafetensorsFile(f"{path}/adapter_model.safetensors")
    tensors = {k: np.array(file.get(k)) for k in file.keys()}
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"
    tensors[key][:8] += 1.0  # expert 0's hidden-size factor no longer shared
    write_safetensors(f"{path}/adapter_model.safetensors", tensors)
    with pytest.raises(ConfigError, match="layer 1 gate_up_proj lora_A differs between experts"):
        load_peft(config, base, path)
    del tensors[key]
    write_safetensors(f"{path}/adapter_model.safetensors", tensors)
    with pytest.raises(KeyError, match="missing tensor.*layers.1.mlp.experts.base_layer.lora_A"):
        load_peft(config, base, path)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        save_peft(lora_config, params, path)
    mixed_config = lora_config.replace(mlp_only_layers=(0,))  # a dense MLP layer among the experts
    with pytest.raises(ConfigError, match="dense MLP layers"):
        save_peft(mixed_config, params, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
