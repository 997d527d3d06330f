"""Expert weights split on embed over `sequence` are gathered inside the layer loop without a whole-stack
copy: the SFT step's temporaries grow with depth by far less than one layer's expert weights per device
(before the fix, XLA copied every layer's stacked expert weights into the all-gather's layout before the
loop: 1.42 GB a layer at the 235B shape). Float32, so XLA:CPU's bf16-to-f32 stack conversion (a CPU-only
artifact) is not in the figure."""

from __future__ import annotations

import pytest

from tests.fake_devices import run_on_8_devices

LORA = dict(lora_rank=4, lora_alpha=4.0, lora_targets=("q", "k", "v", "o"))  # frozen experts: no weight gradients
SHAPE = dict(
    vocab_size=64, hidden_size=256, moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2, num_kv_heads=4
)


def worker() -> dict:
    from polaris_jax.models.config import ModelConfig
    from polaris_jax.models.sharding import DEFAULT_RULES, make_mesh
    from polaris_jax.tools import memory_plan

    mesh = make_mesh({"fsdp": 1, "expert": 2, "sequence": 4})
    temps = {}
    for layers in (2, 4):
        config = ModelConfig.tiny("qwen3_moe", num_layers=layers, remat_policy="full", **SHAPE, **LORA)
        request = memory_plan.PlanRequest(model_config=config, batch_size=2, seq_len=128)
        temps[layers] = memory_plan.plan_train_step(request, mesh, DEFAULT_RULES)["xla"]["temp"]
    # gate, up, down of the experts one device holds (E / expert) with embed split over sequence, float32
    e, d, f = SHAPE["num_experts"] // 2, SHAPE["hidden_size"] // 4, SHAPE["moe_intermediate_size"]
    return dict(per_layer=(temps[4] - temps[2]) / 2, expert_weights_per_layer=3 * e * d * f * 4)


@pytest.mark.slow  # ~17 s of compiles on 8 fake devices (make test budget); CI runs it
def test_expert_weights_are_not_copied_whole_before_the_layer_loop():
    out = run_on_8_devices("tests.models.test_expert_weight_layout", "worker()")
    assert out["per_layer"] < 0.5 * out["expert_weights_per_layer"], out
