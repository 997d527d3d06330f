"""Learning is asserted: a seeded tiny SFT + GRPO run must raise held-out pass@1 by a set margin.

configs/grpo_tiny.py:ci warm-starts a tiny Qwen3 on imperfect arithmetic traces (some skip a step,
some skip the thinking and guess), then runs 30 GRPO steps rewarded by the math verifier. Measured
on a 2-core CPU: 0.21 -> 0.45. The margin (0.10) leaves room for numeric drift across platforms,
while a trainer that does not learn (wrong sign, misaligned log-probs, advantages that ignore the
reward) stays at or below the starting accuracy.
"""

import pytest

from polaris_jax.tools import demo
from tests.config_files import config_module

MARGIN = 0.10


@pytest.mark.slow  # about 2-3 min each on 2 cores: `make test-slow`, which .ci/run also runs
@pytest.mark.parametrize("staleness", [0, 1], ids=["synchronous", "asynchronous_k1_tis"])
def test_grpo_raises_held_out_accuracy(tmp_path, staleness):
    """On the engine (the default backend); k = 1 streams rollouts while the learner updates."""
    config = config_module("grpo_tiny").get_config("ci")
    config.rollout.max_staleness = staleness
    config.algo.off_policy = "tis" if staleness else "none"
    result = demo.run(config, str(tmp_path))
    assert result["accuracy_after"] - result["accuracy_before"] >= MARGIN, result
    assert result["grpo_final_reward_mean"] > result["accuracy_before"], result


@pytest.mark.slow  # about 5 min on 2 cores (SFT warm start of the MoE included)
def test_lora_grpo_on_a_tiny_moe_learns_and_changes_only_the_adapters(tmp_path):
    """The same task on a 4-expert Qwen3-MoE (top-2), GRPO through rank-16 LoRA on attention and experts
    (Tinker's layout). Measured on 2 cores: 0.20 -> 0.45. Then the merged export against the SFT warm start:
    every weight LoRA does not target (embeddings, router, norms, lm_head) is bit-identical, and every
    targeted one moved by a delta of rank <= 16 (per expert too: the hidden-size factor is shared)."""
    import numpy as np

    from polaris_jax.models.safetensors_io import CheckpointReader

    config = config_module("grpo_tiny").get_config("ci")
    with config.unlocked():
        config.model.overrides.update(arch="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=144)
        config.lora.rank, config.lora.alpha = 16, 32.0
        config.optimizer.peak_lr = 1e-3  # LoRA: ~10x the full fine-tuning rate
        config.export.hf = True
    result = demo.run(config, str(tmp_path))
    assert result["accuracy_after"] - result["accuracy_before"] >= MARGIN, result

    before, after = CheckpointReader(str(tmp_path / "sft" / "export" / "hf")), CheckpointReader(result["export_dir"])
    moved = {}
    for name in before.names():
        delta = np.asarray(after.get(name), np.float64) - np.asarray(before.get(name), np.float64)
        if np.any(delta):
            singular = np.linalg.svd(delta, compute_uv=False)
            moved[name] = int(np.sum(singular > 1e-5 * singular[0]))
    kinds = {name.split(".")[-2] for name in moved}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, kinds
    assert all(".mlp.gate." not in n and "norm" not in n and "embed" not in n and "lm_head" not in n for n in moved)
    assert max(moved.values()) <= 16, moved
