"""Bad checkpoints and configs get errors that name the tensor or field."""

import json
import shutil

import numpy as np
import pytest

from polaris_jax.models import ConfigError, ModelConfig, load_hf
from polaris_jax.models.safetensors_io import SafetensorsFile, write_safetensors
from tests.conftest import GOLDEN_DIR


def _copy(tmp_path, name="qwen3_tied"):
    dst = tmp_path / name
    shutil.copytree(GOLDEN_DIR / name, dst)
    return dst


def _rewrite(path, edit):
    f = SafetensorsFile(str(path / "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    edit(tensors)
    write_safetensors(str(path / "model.safetensors"), tensors)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor_is_named(tmp_path):
    path = _copy(tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_hf(path)


def test_wrong_shape_is_named(tmp_path):
    path = _copy(tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((3, 3), np.float32)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(3, 3\)"):
        load_hf(path)


def test_unknown_architecture_is_named(tmp_path):
    path = _copy(tmp_path)
    _edit_config(path, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        load_hf(path)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("hidden_act", "gelu", "hidden_act"),
        ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}, "rope_type"),
        ("use_sliding_window", True, "use_sliding_window"),
        ("num_key_value_heads", 3, "num_key_value_heads"),
        ("dtype", "int8", "dtype"),
    ],
)
def test_unsupported_config_values_are_named(tmp_path, field, value, match):
    path = _copy(tmp_path)
    _edit_config(path, **{field: value})
    with pytest.raises(ConfigError, match=match):
        load_hf(path)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")
    path = _copy(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(path)


def test_corrupt_safetensors(tmp_path):
    path = _copy(tmp_path)
    (path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_hf(path)


def test_config_field_validation():
    with pytest.raises(ConfigError, match="remat_policy"):
        ModelConfig.tiny(remat_policy="sometimes")
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.tiny("qwen3_moe", num_experts_per_tok=9)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(moe_capacity_factor=-1.0), "moe_capacity_factor=-1.0"),
        (dict(moe_dispatch_tokens=-8), "moe_dispatch_tokens=-8"),
        (dict(moe_dispatch_tokens=512, moe_capacity_factor=1.25), "dropless dispatch only"),
    ],
)
def test_bad_moe_knobs_are_named(overrides, match):
    from polaris_jax.models.config import ModelConfig

    with pytest.raises(ConfigError, match=match):
        ModelConfig.tiny("qwen3_moe", **overrides)
