"""The planner's closed-form figures (tools/analytic_memory.py) against the compiler's own: each scaled-down
step below is compiled ahead of time on 8 fake CPU devices (`memory_plan.plan`), and its analytic
activations and train-step peak are within 10% of `compiled.memory_analysis()`'s, and the state's exact
shard sizes (params + optimizer state + batch) add up to the compiled step's argument bytes, and the paged
engine's pool is what its compiled decode program takes.

The shapes are real architectures at two or three layers, none of them a shape the buffer counts were read
from: tensor parallelism, Qwen2 with biases in bf16, sequence parallelism with gradient accumulation,
offloaded remat, Polaris-4B's packed GRPO update at its 53K-token stage, and two expert-parallel (dropless)
MoE steps: Qwen3-235B-A22B's layers under LoRA in bf16 on fsdp=2 x expert=4 (the MoE counts were fitted on
Qwen3-30B-A3B's), Qwen3-30B-A3B with a sequence split, and Qwen3-30B-A3B's layers dispatching 8,192 tokens a
device in runs of 512 (`moe_dispatch_tokens`; how runs enter the count was read from 235B-shaped steps on
expert=8). ~3 minutes of compiles: `make test-slow`, which CI runs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tests.fake_devices import run_on_8_devices
from tests.tools.test_plan import REPO_ROOT

EP_SEQUENCE_MESH = {"fsdp": 2, "expert": 2, "sequence": 2}
# (preset, layers, seq_len, rows, microbatches, loss chunk, mesh, compute dtype, remat policy, LoRA rank)
SFT_CASES = {
    "tensor_parallel": ("qwen3_1p7b", 2, 4096, 8, 1, 512, {"fsdp": 4, "tensor": 2}, "float32", "full", 0),
    "qwen2_bf16": ("qwen2p5_math_1p5b", 2, 4096, 8, 1, 512, {"fsdp": 8}, "bfloat16", "full", 0),
    "sequence_accumulated": ("qwen3_0p6b", 3, 8192, 16, 2, 1024, {"fsdp": 2, "sequence": 4}, "float32", "full", 0),
    "offload_bf16": ("qwen3_1p7b", 3, 4096, 8, 1, 512, {"fsdp": 8}, "bfloat16", "offload", 0),
    "moe_ep_lora": ("qwen3_235b_a22b", 2, 2048, 8, 1, 512, {"fsdp": 2, "expert": 4}, "bfloat16", "full", 32),
    "moe_ep_sequence": ("qwen3_30b_a3b", 3, 4096, 8, 1, 512, EP_SEQUENCE_MESH, "float32", "full", 0),
    "moe_dispatch_runs": ("qwen3_30b_a3b", 3, 8192, 8, 1, 512, {"fsdp": 2, "expert": 4}, "bfloat16", "full", 32),
}
MODEL_OVERRIDES = {"moe_dispatch_runs": dict(moe_dispatch_tokens=512)}  # 8,192 tokens a device in 16 runs
FIGURES = ("activations_bytes", "analytic_activations_bytes", "train_peak_bytes", "analytic_train_peak_bytes")


def _figures(result: dict) -> dict:
    out = {k: result[k] for k in FIGURES}
    out["state_bytes"] = result["params_bytes"] + result["optimizer_state_bytes"] + result["batch_bytes"]
    out["xla_argument_bytes"] = result["xla_argument_bytes"]
    return out


def worker() -> dict:
    import jax

    from polaris_jax.models.presets import preset
    from polaris_jax.models.sharding import make_mesh, sharding_rules
    from polaris_jax.tools import memory_plan
    from polaris_jax.tools import plan as plan_cli
    from tests.config_files import config_module

    results = {}
    for name, (model, layers, length, rows, micro, chunk, mesh, dtype, remat, rank) in SFT_CASES.items():
        lora = dict(lora_rank=rank, lora_alpha=float(rank)) if rank else {}
        overrides = {**lora, **MODEL_OVERRIDES.get(name, {})}
        config = preset(model, num_layers=layers, compute_dtype=dtype, remat_policy=remat, **overrides)
        request = memory_plan.PlanRequest(config, rows, length, microbatches=micro, loss_chunk=chunk)
        size = 1
        for axis_size in mesh.values():
            size *= axis_size
        results[name] = _figures(memory_plan.plan(request, make_mesh(mesh, jax.devices()[:size])))

    # Polaris-4B's update at its longest stage, packed, on its own fsdp=2 x sequence=4 mesh, at 2 layers.
    recipe = config_module("polaris_qwen3_4b").get_config()
    fields = dict(plan_cli.shape_defaults(recipe), engine=None, rollout_batch=0, rollout_len=0)
    model = plan_cli.model_config_for(recipe, "qwen3_4b").replace(num_layers=2)
    request = memory_plan.PlanRequest(model_config=model, **fields)
    mesh = make_mesh({"fsdp": 2, "sequence": 4})
    plan = memory_plan.plan(request, mesh, sharding_rules(recipe), plan_cli.optimizer_for(recipe))
    results["polaris_grpo_update"] = dict(_figures(plan), pack_tokens=plan["pack_tokens"])

    # The engine's page pool (exact, from its shardings) against what its compiled decode takes.
    from polaris_jax.sampling.engine_settings import EngineSettings
    from polaris_jax.tools import rollout_plan

    engine = EngineSettings(max_slots=16, num_pages=2048, page_size=64, max_seq_len=8192)
    rollout = rollout_plan.plan_engine(dataclasses.replace(request, engine=engine), mesh, sharding_rules(recipe))
    results["engine_pool"] = {k: rollout[k] for k in ("kv_cache", "decode_arguments_beside_params")}
    return results


@pytest.fixture(scope="module")
def compiled_and_analytic() -> dict:
    return run_on_8_devices("tests.tools.test_analytic_memory", "worker()")


@pytest.mark.slow
@pytest.mark.parametrize("case", [*SFT_CASES, "polaris_grpo_update"])
def test_analytic_figures_are_within_10_percent_of_the_compiled_step(compiled_and_analytic, case):
    r = compiled_and_analytic[case]
    if case == "polaris_grpo_update":
        assert r["pack_tokens"] == 53_248, r
    for figure in ("activations_bytes", "train_peak_bytes"):
        ratio = r[f"analytic_{figure}"] / r[figure]
        assert 0.9 <= ratio <= 1.1, (figure, ratio, r)
    # The exact terms: the state's shards are what the compiled step takes (plus the rng key).
    assert 0 <= r["xla_argument_bytes"] - r["state_bytes"] <= 64, r


@pytest.mark.slow
def test_the_page_pool_figure_is_what_the_compiled_decode_takes(compiled_and_analytic):
    r = compiled_and_analytic["engine_pool"]
    assert r["kv_cache"] > 0 and 0.9 <= r["kv_cache"] / r["decode_arguments_beside_params"] <= 1.0, r


def test_the_estimate_covers_full_or_offloaded_remat_and_dropless_all_moe_models_only():
    from polaris_jax.models.config import ModelConfig
    from polaris_jax.models.sharding import make_mesh
    from polaris_jax.tools import analytic_memory, memory_plan

    mesh = make_mesh({"fsdp": 1})
    exact = dict(params=10, trainable_params=10, optimizer_state=20, batch=1)

    def estimate(config):
        return analytic_memory.estimate(memory_plan.PlanRequest(config, 2, 64), mesh, exact)

    dense = ModelConfig.tiny(remat_policy="full")
    full = estimate(dense)
    assert full["saved_residuals"] == 2 * 2 * 64 * 64 * 4  # layers x rows x tokens x hidden, float32 on CPU
    assert full["train_peak"] == 10 + 20 + 1 + 10 + full["activations"]
    assert estimate(dataclasses.replace(dense, remat_policy="offload"))["saved_residuals"] == 0
    assert estimate(dataclasses.replace(dense, remat_policy="none")) is None
    moe = ModelConfig.tiny("qwen3_moe", remat_policy="full")
    # Over 2 micro passes of the same rows the experts' gradients (2 layers x 4 experts x 3 x 64 x 32 float32)
    # and the unembedding's (256 x 64) accumulate beside the rest.
    one_pass = analytic_memory.estimate(memory_plan.PlanRequest(moe, 2, 64), mesh, exact)
    two_passes = analytic_memory.estimate(memory_plan.PlanRequest(moe, 4, 64, microbatches=2), mesh, exact)
    assert two_passes["activations"] - one_pass["activations"] == (2 * 4 * 3 * 64 * 32 + 256 * 64) * 4
    assert estimate(dataclasses.replace(moe, moe_capacity_factor=1.25)) is None
    assert estimate(dataclasses.replace(moe, num_layers=2, mlp_only_layers=(0,))) is None
    assert "moe_capacity_factor=1.25" in analytic_memory.out_of_scope(
        dataclasses.replace(moe, moe_capacity_factor=1.25)
    )


def test_analytic_flag_plans_polaris_without_compiling():
    """`--analytic`: the closed-form plan in seconds; the exact terms are Qwen3-4B's published shape."""
    from tests.tools.test_plan import _plan, _qwen3_params

    flags = ("--config=configs/polaris_qwen3_4b.py", "--model=qwen3_4b", "--mesh=fsdp=2,sequence=4", "--analytic")
    r = _plan(*flags)
    assert r["estimate"] == "analytic" and r["devices"] == 8 and r["seq_len"] == 53_248
    params = _qwen3_params(151936, 2560, 36, 32, 8, 128, 9728, tied=True)
    assert params * 4 / 8 <= r["params_bytes"] <= params * 4 / 8 * 1.01  # float32, split over all 8
    terms = r["params_bytes"] + r["optimizer_state_bytes"] + r["batch_bytes"] + r["analytic_activations_bytes"]
    assert r["train_peak_bytes"] == r["analytic_train_peak_bytes"] == terms
    assert r["analytic_saved_residuals_bytes"] == 36 * 53_248 // 4 * 2560 * 4  # layers x own tokens x D, float32
    assert r["train_fits"] is True and "rollout_peak_bytes" not in r


def test_analytic_flag_refuses_what_it_does_not_model():
    proc = subprocess.run(
        [sys.executable, "-m", "polaris_jax.tools.plan", "--config=configs/sft_tiny.py", "--analytic"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "remat_policy='none'" in proc.stderr, proc.stderr[-2000:]
