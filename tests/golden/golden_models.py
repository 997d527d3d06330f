"""The tiny models behind the golden files: transformers config kwargs per golden directory.

Read by make_golden.py (run as a script from this folder); kept apart so the generator stays short.
"""

_COMMON = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)
_MOE = dict(
    _COMMON,
    vocab_size=128,
    intermediate_size=96,
    num_hidden_layers=3,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    router_aux_loss_coef=0.02,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
)

# name -> (architecture, config kwargs, first seed, has SFT golden)
MODELS = {
    "qwen2": (
        "Qwen2ForCausalLM",
        dict(
            _COMMON,
            vocab_size=256,
            intermediate_size=128,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
        ),
        1000,
        False,
    ),
    "qwen3_tied": (
        "Qwen3ForCausalLM",
        dict(
            _COMMON,
            vocab_size=256,
            intermediate_size=128,
            num_hidden_layers=2,
            head_dim=32,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
        ),
        2000,
        True,
    ),
    "qwen3_untied": (
        "Qwen3ForCausalLM",
        dict(
            _COMMON,
            vocab_size=256,
            intermediate_size=128,
            num_hidden_layers=2,
            head_dim=16,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
        ),
        3000,
        False,
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        dict(_MOE, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0], tie_word_embeddings=False),
        4000,
        True,
    ),
    "qwen3_moe_nonorm": (
        "Qwen3MoeForCausalLM",
        dict(_MOE, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[], tie_word_embeddings=False),
        5000,
        False,
    ),
    "qwen3_yarn": (
        "Qwen3ForCausalLM",
        dict(
            _COMMON,
            vocab_size=256,
            intermediate_size=128,
            num_hidden_layers=2,
            head_dim=32,
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10_000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 256,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
            },
        ),
        6000,
        False,
    ),
}
