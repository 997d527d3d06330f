"""FLOPs per step against direct counts, peak-FLOPs lookup, ETA, and the metric files."""

import json

import jax
import numpy as np
import pytest

from polaris_jax.models import ModelConfig
from polaris_jax.models.attention import self_mask
from polaris_jax.models.params import param_shapes
from polaris_jax.train import metrics
from tests.train import sft_helpers

_MATMULS = {"q", "k", "v", "o", "gate", "up", "down", "lm_head", "router"}


def _matmul_weights(config) -> int:
    """Weights of the matmul kernels a token passes through, counted from the parameter shapes."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(config)):
        name = path[-1].key
        size = int(np.prod(leaf.shape))
        base = name.split("_lora_")[0]
        if base in _MATMULS:
            if path[0].key == "moe_layers" and base in ("gate", "up", "down"):
                size = size * config.num_experts_per_tok // config.num_experts
            total += size
    if config.tie_word_embeddings:
        total += config.vocab_size * config.hidden_size  # the tied embedding is also the output projection
    return total


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig.qwen3_0p6b(),
        ModelConfig.qwen3_8b(),
        ModelConfig.r1_distill_qwen_14b(),
        ModelConfig.tiny(arch="qwen3_moe", vocab_size=64),
        ModelConfig.qwen3_30b_a3b(),
        ModelConfig.qwen3_0p6b(lora_rank=8, lora_alpha=32.0),
    ],
    ids=["0p6b", "8b", "14b", "moe", "30b_a3b", "lora"],
)
def test_matmul_params_match_the_parameter_shapes(config):
    trainable, frozen = metrics.matmul_params_per_token(config, lora=config.lora_rank > 0)
    assert trainable + frozen == _matmul_weights(config)
    if config.lora_rank:
        assert 0 < trainable < 0.01 * frozen


def test_attended_pairs_count_the_attention_mask():
    batch = sft_helpers.random_packed_batch(0, batch=3, length=40, vocab=50)
    mask = np.asarray(self_mask(batch["segment_ids_bt"]))
    assert metrics.attended_pairs(batch["segment_ids_bt"]) == int(mask.sum())


def test_step_flops_formula():
    config = ModelConfig.tiny(vocab_size=64)
    n, _ = metrics.matmul_params_per_token(config)
    segment_ids = np.array([[1, 1, 1, 2, 2, 0]])
    pairs = 6 + 3
    expected = 6 * n * 5 + 12 * config.num_layers * config.num_heads * config.head_dim * pairs
    assert metrics.step_flops(config, 5, metrics.attended_pairs(segment_ids)) == expected


def test_peak_flops_table():
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989.4e12
    assert metrics.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
    assert metrics.peak_flops_per_device("cpu") is None
    assert metrics.peak_flops_per_device("cpu", override=1e12) == 1e12


def test_progress_bar_eta_excludes_the_first_step():
    bar = metrics.ProgressBar(total_steps=100, width=10)
    assert "eta ?" in bar.render(1, now=50.0)  # the first (compiling) step sets the anchor
    line = bar.render(11, now=60.0)  # 10 steps in 10 s, 89 to go
    assert line.startswith("step 11/100 [#---------]  11%") and line.endswith("eta 0:01:29")


def test_writer_and_accumulator(tmp_path):
    acc = metrics.Accumulator()
    for loss, lr in [(1.0, 0.1), (3.0, 0.2)]:
        acc.add({"loss": jax.numpy.float32(loss), "learning_rate": jax.numpy.float32(lr)})
    averaged = acc.compute()
    assert averaged == pytest.approx({"loss": 2.0, "learning_rate": 0.2})  # mean, and the last lr
    assert acc.compute() == {}
    lines = []
    writer = metrics.MetricWriter(
        str(tmp_path),
        total_steps=10,
        stream=type("S", (), {"write": lambda self, s: lines.append(s), "flush": lambda self: None})(),
    )
    writer.write_scalars(2, {"loss": 2.0, "data/examples": 7.0})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 2, "loss": 2.0, "data/examples": 7.0}
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
    assert "loss=2" in "".join(lines) and "data/examples" not in "".join(lines)
