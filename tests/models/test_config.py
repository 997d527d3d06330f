"""ModelConfig from both config.json key layouts, presets, and the layer-run plan."""

import pytest

from polaris_jax.models import PRESETS, ModelConfig, preset
from polaris_jax.models.params import param_shapes

OLD_STYLE = {
    "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "max_position_embeddings": 40960,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}
NEW_STYLE = {k: v for k, v in OLD_STYLE.items() if k not in ("rope_theta", "torch_dtype", "num_experts", "rope_scaling")}
NEW_STYLE.update(dtype="bfloat16", num_local_experts=128,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 32768})


def test_old_and_new_hf_keys_give_the_same_config():
    old, new = ModelConfig.from_hf(OLD_STYLE), ModelConfig.from_hf(NEW_STYLE)
    assert old == new
    assert old.num_experts == 128 and old.param_dtype == "bfloat16" and old.rope_theta == 1e6
    assert old.rope_scaling[:3] == ("yarn", 4.0, 32768)


def test_to_hf_round_trips():
    config = ModelConfig.from_hf(OLD_STYLE)
    assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_shapes_without_allocating(name):
    config = preset(name)
    shapes = param_shapes(config)
    assert shapes["embed"].shape == (config.vocab_size, config.hidden_size)


def test_preset_sizes_match_published_parameter_counts():
    import math

    def billions(config):
        import jax
        return sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(config))) / 1e9
    assert billions(preset("qwen3_0p6b")) == pytest.approx(0.596, abs=0.01)
    assert billions(preset("qwen3_8b")) == pytest.approx(8.19, abs=0.05)
    assert billions(preset("qwen3_30b_a3b")) == pytest.approx(30.5, abs=0.2)
    assert billions(preset("r1_distill_qwen_14b")) == pytest.approx(14.77, abs=0.05)


def test_layer_runs_follow_transformers_sparse_rule():
    config = ModelConfig.tiny("qwen3_moe", num_layers=6, decoder_sparse_step=2, mlp_only_layers=(5,))
    # transformers: MoE iff layer not in mlp_only_layers and (layer + 1) % step == 0.
    assert [config.layer_is_moe(i) for i in range(6)] == [False, True, False, True, False, False]
    assert config.layer_runs() == [("dense", 0, 1), ("moe", 1, 1), ("dense", 2, 1), ("moe", 3, 1), ("dense", 4, 2)]
