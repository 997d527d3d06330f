"""save_hf output loads in transformers with the same logits; failures leave nothing behind."""

import json
import os

import jax
import numpy as np
import pytest

from polaris_jax.models import ModelConfig, add_lora, hf_io, init_params, load_hf, logits, save_hf

IDS = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [0, 0, 2, 7, 1, 8, 2, 8]], np.int32)
MASK = np.array([[1] * 8, [0, 0] + [1] * 6], np.int32)


def _config(arch):
    extra = {"mlp_only_layers": (0,)} if arch == "qwen3_moe" else {}
    return ModelConfig.tiny(arch, num_layers=3, **extra)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3_moe"])
def test_round_trip_through_transformers(arch, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.models.hf_factory import hf_logits

    config = _config(arch)
    params = init_params(config, jax.random.key(1), std=0.2)
    # Shards of ~50 KB force the index + multi-file layout.
    save_hf(config, params, tmp_path / "out", max_shard_bytes=50_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ours = np.asarray(logits(config, params, IDS, MASK))
    err = np.abs(hf_logits(model, IDS, MASK) - ours)[MASK.astype(bool)]
    assert err.max() <= 1e-4
    config2, params2 = load_hf(tmp_path / "out")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])  # MoE: expert LoRA in Tinker's layout
def test_lora_is_merged_on_export(arch, tmp_path):
    config = _config(arch)
    base = init_params(config, jax.random.key(0), std=0.2)
    lora_config, params = add_lora(config, base, jax.random.key(1), rank=4, alpha=8.0)
    # Non-zero B so the adapters actually change the model.
    params = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.1 if "_lora_b" in str(p) else x, params)
    save_hf(lora_config, params, tmp_path / "merged")
    merged_config, merged = load_hf(tmp_path / "merged")
    before = np.asarray(logits(lora_config, params, IDS, MASK))
    after = np.asarray(logits(merged_config, merged, IDS, MASK))
    assert np.abs(before - np.asarray(logits(config, base, IDS, MASK))).max() > 1e-2
    np.testing.assert_allclose(after, before, atol=1e-4)


def test_failed_export_leaves_no_partial_directory(tmp_path, monkeypatch):
    config = _config("qwen3")
    params = init_params(config, jax.random.key(0))

    def broken(path, tensors, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        save_hf(config, params, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    config = _config("qwen3")
    params = init_params(config, jax.random.key(0))
    save_hf(config, params, tmp_path / "out")
    before = sorted(os.listdir(tmp_path / "out"))
    with pytest.raises(FileExistsError):
        save_hf(config, params, tmp_path / "out")
    monkeypatch.setattr(hf_io, "write_safetensors", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        save_hf(config, params, tmp_path / "out", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(tmp_path / "out")) == before
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
