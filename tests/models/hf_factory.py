"""Tiny random transformers models for live parity tests (weights perturbed so every part matters)."""

import torch
import transformers

BASE = dict(
    vocab_size=160,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


def hf_config(arch: str, **overrides):
    if arch == "qwen2":
        return transformers.Qwen2Config(**{**BASE, **overrides})
    if arch == "qwen3":
        return transformers.Qwen3Config(**{**BASE, "head_dim": 32, **overrides})
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **{
                **BASE,
                "head_dim": 16,
                "num_experts": 6,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 24,
                "mlp_only_layers": [1],
                **overrides,
            }
        )
    raise ValueError(arch)


def make_hf_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cls = {
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    }[arch]
    model = cls(hf_config(arch, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def hf_logits(model, input_ids, attention_mask):
    import numpy as np

    ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
    mask = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().numpy()
