"""Every flagship recipe config fits the hardware it names: the planner compiles its real train step (the
GRPO update, packed where the recipe packs; the SFT step) and its rollout (the paged engine's programs over
its page pool, on the recipe's rollout mesh) at full depth on fake CPU devices, and each peak is at most
90% of the device's memory. GRPO recipes are planned at their longest stage: the packed rows, the
per-response arrays and the engine's page-table width only grow with the stage's length, so the longest
stage bounds the others. About a minute per recipe: `make test-slow`, which CI runs.

The device memory is the vendor's figure (80 GB = 80e9 bytes for H100 / H800), not the planner's."""

from __future__ import annotations

import pytest

from tests.tools.test_plan import _plan

DEVICE_80GB = 80e9
GIB = 1024**3

# (config, model preset with the checkpoint's shape, devices the config's mesh is meant for)
RECIPES = [  # polaris_qwen3_4b: the contract test below, on its own mesh
    ("polaris_r1_distill_7b", "r1_distill_qwen_7b", 8),
    ("sft_r1_distill_qwen3_8b", "deepseek_r1_0528_qwen3_8b", 8),
    ("sft_fathom_r1_14b", "r1_distill_qwen_14b", 8),
    ("lora_rl_qwen3_8b", "qwen3_8b", 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("config,model,devices", RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_fits_its_hardware(config, model, devices):
    plan = _plan(f"--config=configs/{config}.py", f"--model={model}")
    assert plan["devices"] == devices and plan["hardware"] in ("h100", "h800")
    assert plan["train_peak_bytes"] <= 0.9 * DEVICE_80GB, plan
    if config.startswith(("polaris", "lora_rl")):  # GRPO: the engine's rollout is planned too
        assert plan["engine_pages"] > 0 and plan["kv_cache_bytes"] > 0
        assert plan["rollout_peak_bytes"] <= 0.9 * DEVICE_80GB, plan


@pytest.mark.slow
@pytest.mark.parametrize("stage,response_tokens", [(0, 39_936), (1, 48_128)])
def test_polaris_shorter_stages_fit_too(stage, response_tokens):
    """Every stage, not only the longest: the 40K and 48K stages on the same mesh (each term of a plan grows
    with the stage's length, so these sit below the contract's 52K stage)."""
    plan = _plan("--config=configs/polaris_qwen3_4b.py", "--model=qwen3_4b", f"--stage={stage}")
    assert plan["seq_len"] == 1024 + response_tokens
    for peak in (plan["train_peak_bytes"], plan["rollout_peak_bytes"]):
        assert peak <= 0.9 * DEVICE_80GB, plan


@pytest.mark.slow
def test_polaris_longest_stage_on_fsdp2_sequence4_plans_under_72_gib():
    """The issue's contract: the 53,248-token stage, sequence-parallel over 4 of 8 fake devices (the
    config's own mesh), under 72 GiB and under 90% of an H800's 80 GB."""
    flags = ("--config=configs/polaris_qwen3_4b.py", "--model=qwen3_4b", "--mesh=fsdp=2,sequence=4")
    plan = _plan(*flags, module="polaris_jax.plan")  # the published command
    assert plan["devices"] == 8 and plan["mesh"] == {"fsdp": 2, "sequence": 4} and plan["hardware"] == "h800"
    assert plan["seq_len"] == 1024 + 52_224
    for peak in (plan["train_peak_bytes"], plan["rollout_peak_bytes"]):
        assert peak <= 72 * GIB and peak <= 0.9 * DEVICE_80GB, plan
