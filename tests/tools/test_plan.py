"""The memory planner CLI on the tiny SFT config and on a real size (Qwen3-8B, LoRA rank 32, 8 fake devices).

Expected sizes come from the architectures' published shapes counted by hand here, not from the
planner's own helpers. Each case runs in a subprocess, because the planner picks the number of fake
CPU devices before JAX starts.
"""

import json
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _plan(*flags, module: str = "polaris_jax.tools.plan") -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--format=json", *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _qwen3_params(vocab, d, layers, heads, kv_heads, head_dim, ffn, tied):
    """Parameter count of a dense Qwen3 (q/k RMSNorm per head, no biases)."""
    per_layer = (
        d * heads * head_dim
        + 2 * d * kv_heads * head_dim
        + heads * head_dim * d  # q, k, v, o
        + 3 * d * ffn
        + 2 * d
        + 2 * head_dim
    )  # SwiGLU, two RMSNorms, q_norm and k_norm
    return vocab * d * (1 if tied else 2) + d + layers * per_layer


@pytest.fixture(scope="module")
def tiny_plan():
    return _plan(
        "--config=configs/sft_tiny.py",
        "--mesh=fsdp=2",
        "--rollout_batch=8",
        "--rollout_len=64",
        "--rollout_prompt_len=16",
        "--samples_per_prompt=4",
        "--batch_size=4",
        "--seq_len=64",
    )


def test_tiny_config_plan(tiny_plan):
    r = tiny_plan
    assert r["devices"] == 2 and r["mesh"] == {"fsdp": 2} and r["lora_rank"] == 0
    # sft_tiny: hidden 64, 2 layers, 4 heads of 16 (2 kv heads), ffn 128, untied; float32 masters.
    # With fsdp=2 every matrix (all carry the `embed` axis) is halved; the RMSNorm vectors are replicated.
    vectors = 64 + 2 * (2 * 64 + 2 * 16)
    # The vocabulary is the synthetic tokenizer's, so solve for it from the reported bytes and check it is whole.
    matrices_per_device = r["params_bytes"] / 4 - vectors
    layer_matrices = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    vocab = (2 * matrices_per_device - layer_matrices) / (2 * 64)
    assert vocab == int(vocab) and 20 < vocab <= 256
    # AdamW keeps two float32 moments per trainable weight (plus a few scalar counters).
    assert 2 * r["params_bytes"] <= r["optimizer_state_bytes"] <= 2 * r["params_bytes"] + 64
    assert r["trainable_params_bytes"] == r["params_bytes"]
    assert r["activations_bytes"] > 0
    assert r["train_peak_bytes"] >= r["params_bytes"] + r["optimizer_state_bytes"]
    # KV cache: 2 (k, v) x layers x rows x slots x kv_heads x head_dim x 4 bytes, rows split over 2 devices.
    assert r["kv_cache_bytes"] == 2 * 2 * (8 // 2) * 64 * 2 * 16 * 4
    assert r["rollout_temp_bytes"] >= r["kv_cache_bytes"]


def test_tiny_plan_flops_cover_the_model_flops(tiny_plan):
    """Compiled matmul FLOPs x devices vs 6·N·tokens + causal attention: the program computes the
    full (not causal-halved) attention square, so it may exceed the model figure, but not fall short."""
    r = tiny_plan
    compiled = r["matmul_flops_per_device"] * r["devices"]
    assert r["model_flops_per_step"] <= compiled <= 1.6 * r["model_flops_per_step"]


def test_qwen3_8b_lora_rank32_plan():
    r = _plan("--model=qwen3_8b", "--mesh=fsdp=8", "--lora_rank=32", "--batch_size=8", "--seq_len=256", "--remat=full")
    total = _qwen3_params(151936, 4096, 36, 32, 8, 128, 12288, tied=False)
    assert abs(total / 1e9 - 8.19) < 0.01  # Qwen3-8B's model card: 8.2B parameters
    base_per_device = total * 4 / 8
    lora = 36 * 32 * ((4096 + 32 * 128) * 2 + (4096 + 8 * 128) * 2 + (4096 + 12288) * 3)  # q,o; k,v; gate,up,down
    assert base_per_device < r["params_bytes"] < base_per_device * 1.01 + lora * 4
    assert lora * 4 / 8 <= r["trainable_params_bytes"] <= lora * 4
    # Optimizer state covers the adapters only: two moments each.
    assert 2 * r["trainable_params_bytes"] <= r["optimizer_state_bytes"] <= 2 * r["trainable_params_bytes"] + 64
    # ... so it is a small fraction of full fine-tuning's 2 x 8 bytes per base weight, even though the
    # B factors of q/k/v (no `embed` axis) stay replicated under pure FSDP.
    assert r["optimizer_state_bytes"] <= 2 * lora * 4 + 64
    assert r["optimizer_state_bytes"] < 0.1 * 2 * base_per_device
    assert r["activations_bytes"] > 0 and r["matmul_flops_per_device"] > 0


@pytest.mark.slow  # ~20 s: make test-slow (the 20-minute budget of make test)
def test_attention_impl_flag_plans_blockwise_attention_in_linear_memory():
    """At 4,096 tokens dense attention holds [heads, T, T] float32 scores per row; blockwise does not."""
    common = ("--config=configs/sft_tiny.py", "--mesh=fsdp=1", "--batch_size=1", "--seq_len=4096", "--remat=none")
    dense, flash = _plan(*common, "--attention_impl=dense"), _plan(*common, "--attention_impl=flash")
    scores = 4 * 4096 * 4096 * 4  # sft_tiny: 4 query heads
    assert dense["activations_bytes"] >= scores
    assert flash["activations_bytes"] < scores / 2 and flash["activations_bytes"] < dense["activations_bytes"] / 8


def test_hardware_flag_says_which_peak_fits_and_what_overflows():
    from polaris_jax.tools.plan_report import fit

    plan = _plan("--config=configs/sft_tiny.py", "--mesh=fsdp=1", "--batch_size=2", "--seq_len=64", "--hardware=v6e")
    assert plan["hardware"] == "v6e" and plan["device_memory_bytes"] == 32 * 10**9
    assert plan["train_fits"] is True and plan["train_overflow"] is None and "rollout_fits" not in plan
    small = {"params_bytes": 1, "optimizer_state_bytes": 2, "activations_bytes": 3, "train_peak_bytes": 6}
    assert fit(small, "h100") == {
        "hardware": "h100",
        "device_memory_bytes": 80 * 10**9,
        "train_fits": True,
        "train_overflow": None,
    }
    big = dict(small, activations_bytes=10**12, train_peak_bytes=10**12 + 3, kv_cache_bytes=5, rollout_temp_bytes=9)
    out = fit(dict(big, rollout_peak_bytes=12), "h200")
    assert out["train_overflow"] == "activations" and out["rollout_fits"] is True


@pytest.mark.slow  # two plans, ~20 s; the values tests of the options run in the default tier
def test_memory_options_are_counted():
    """remat offload: the stacked layer inputs (2 layers x 2 rows per device x 256 tokens x 64 float32) leave
    the device activations for host memory; bf16 params + float32 master: params halve and the optimiser state
    holds the master beside the two moments (3 x float32 per weight)."""
    common = ("--config=configs/sft_tiny.py", "--mesh=fsdp=2", "--batch_size=4", "--seq_len=256")
    full = _plan(*common, "--remat=full")
    offload = _plan(
        *common, "--remat=offload", "--config.model.param_dtype=bfloat16", "--config.optimizer.master_weights=True"
    )
    assert full["host_activations_bytes"] == 0
    assert offload["host_activations_bytes"] == 2 * 2 * 256 * 64 * 4
    assert offload["activations_bytes"] + offload["host_activations_bytes"] == pytest.approx(
        full["activations_bytes"], rel=0.02
    )
    assert offload["params_bytes"] == full["params_bytes"] // 2
    assert abs(offload["optimizer_state_bytes"] - 3 * full["params_bytes"]) <= 64


@pytest.mark.slow  # a GRPO plan, ~17 s
def test_optimizer_offload_leaves_the_rollout_peak_to_params_and_engine():
    plan = _plan("--config=configs/grpo_tiny.py", "--config.optimizer.offload_during_rollout=True")
    assert plan["optimizer_state_bytes"] > 0 and plan["rollout_optimizer_state_bytes"] == 0
    assert plan["rollout_peak_bytes"] == plan["params_bytes"] + plan["rollout_temp_bytes"]


def test_a_preset_keeps_the_configs_model_knobs():
    """--model=PRESET swaps the shape, not the config's numerics and kernels (capacity factor, dtypes, remat).
    In a subprocess: tools.plan defines absl flags that polaris_jax.main also defines."""
    code = """
import json
from polaris_jax.tools.plan import model_config_for
from polaris_jax.train.grpo.config import default_config
config = default_config()
config.model.update(moe_capacity_factor=1.25, param_dtype="bfloat16", remat_policy="offload", attention_impl="flash")
cfg = model_config_for(config, "qwen3_30b_a3b")
names = ("moe_capacity_factor", "param_dtype", "remat_policy", "attention_impl", "num_experts")
print(json.dumps({name: getattr(cfg, name) for name in names}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "moe_capacity_factor": 1.25,
        "param_dtype": "bfloat16",
        "remat_policy": "offload",
        "attention_impl": "flash",
        "num_experts": 128,
    }


@pytest.mark.slow  # ~20-25 s each on 2 cores (make test budget); CI runs both
@pytest.mark.parametrize("pack_tokens", [0, 96])
def test_router_replay_plans_the_recorded_experts(pack_tokens):
    """A tiny MoE GRPO update with router replay (padded and packed) compiles in the planner, and its batch
    holds the replayed experts: int16, one per position, MoE layer and top-k slot."""
    import dataclasses

    import jax
    from jax.sharding import Mesh

    from polaris_jax.models import ModelConfig
    from polaris_jax.tools import memory_plan
    from tests.train.grpo import grpo_helpers

    cfg = ModelConfig.tiny("qwen3_moe", vocab_size=64, num_layers=2, num_experts=4, num_experts_per_tok=2)
    mesh = Mesh(jax.devices()[:1], ("fsdp",))
    batch = {}
    for replay in (False, True):
        settings = dataclasses.replace(grpo_helpers.settings(pack_tokens=pack_tokens), router_replay=replay)
        request = memory_plan.PlanRequest(model_config=cfg, batch_size=8, seq_len=48, update=settings)
        batch[replay] = memory_plan.plan_train_step(request, mesh)["batch"]
    # Without replay, packed: four int32 [Mb, K, L] arrays, then flat index, mask, logprobs [B, R], advantages.
    per_response = 8 * grpo_helpers.RESPONSE * 3 * 4 + 8 * 4
    positions = 8 * 48 if not pack_tokens else (batch[False] - per_response) // 16
    assert batch[True] - batch[False] == positions * 2 * 2 * 2, batch  # layers x top-k x int16


@pytest.mark.slow  # ~23 s; test_mesh_candidates_and_ties covers the search logic in make test
def test_mesh_auto_keeps_the_layout_with_the_smallest_train_peak():
    r = _plan("--config=configs/sft_tiny.py", "--mesh=auto", "--devices=4", "--batch_size=4", "--seq_len=256")
    table = {json.dumps(row["mesh"], sort_keys=True): row for row in r["mesh_search"]}
    assert set(table) == {'{"fsdp": 4}', '{"fsdp": 2, "sequence": 2}', '{"fsdp": 1, "sequence": 4}'}, table
    assert "Ulysses" in table['{"fsdp": 1, "sequence": 4}']["error"]  # 2 kv heads do not split 4 ways
    peaks = [row["train_peak_bytes"] for row in r["mesh_search"] if "train_peak_bytes" in row]
    assert r["devices"] == 4 and r["train_peak_bytes"] <= min(peaks) * 1.01
    assert table[json.dumps(r["mesh"], sort_keys=True)]["train_peak_bytes"] == r["train_peak_bytes"]


def test_mesh_candidates_and_ties():
    from polaris_jax.models import ModelConfig
    from polaris_jax.tools import mesh_search

    moe = ModelConfig.tiny("qwen3_moe", num_experts=6, num_experts_per_tok=2)
    shapes = mesh_search.candidate_meshes(8, moe)
    assert {s.get("expert", 1) for s in shapes} == {1, 2}  # 4 and 8 do not divide 6 experts
    assert all(s["fsdp"] * s.get("expert", 1) * s.get("sequence", 1) == 8 for s in shapes) and len(shapes) == 7
    assert mesh_search.candidate_meshes(4, ModelConfig.tiny("qwen3")) == [
        {"fsdp": 4},
        {"fsdp": 2, "sequence": 2},
        {"fsdp": 1, "sequence": 4},
    ]
    peaks = {"a": 10_000, "b": 10_050, "c": 9_960}

    def peak_of(mesh):
        if mesh["name"] == "bad":
            raise ValueError("refused\nsecond line")
        return peaks[mesh["name"]]

    candidates = [{"name": "a", "sequence": 2}, {"name": "b"}, {"name": "c", "expert": 2}, {"name": "bad"}]
    best, table = mesh_search.search(peak_of, candidates)
    assert best["name"] == "b"  # within 1% of the least, and no sequence or expert shards
    assert table[-1] == {"mesh": {"name": "bad"}, "error": "refused"}
    with pytest.raises(ValueError, match="no mesh"):
        mesh_search.search(peak_of, [{"name": "bad"}])
