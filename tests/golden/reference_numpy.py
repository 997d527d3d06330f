"""Plain-numpy forward pass written from README.md's formulas, checked against the golden files.

It exists to prove that the conventions the README states are the ones transformers used, so a
JAX implementation can follow the README with confidence. It is not a test of polaris_jax.

    /work/main/.venv/bin/python tests/golden/reference_numpy.py
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import load_file

GOLDEN_DIR = os.path.dirname(os.path.abspath(__file__))


def rope_inv_freq_and_scale(cfg: dict, head_dim: int) -> tuple[np.ndarray, float]:
    rope = cfg["rope_parameters"]
    base = rope["rope_theta"]
    pos_freqs = base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope["rope_type"] == "default":
        return 1.0 / pos_freqs, 1.0
    assert rope["rope_type"] == "yarn", rope
    factor, orig = rope["factor"], rope["original_max_position_embeddings"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        get = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        attention_factor = (
            get(factor, mscale) / get(factor, mscale_all_dim) if mscale and mscale_all_dim else get(factor)
        )
    corr = lambda rot: head_dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = corr(beta_fast), corr(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1 keeps the original frequency, 0 divides it by factor
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotate(x_bthd, cos_btd, sin_btd):
    half = x_bthd.shape[-1] // 2
    rotated = np.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos_btd[:, :, None] + rotated * sin_btd[:, :, None]


def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def silu(x):
    return x / (1 + np.exp(-x))


def moe_block(cfg, w, prefix, x_nd):
    """Returns (output [N, D], router logits [N, E])."""
    router_logits_ne = x_nd @ w[f"{prefix}.gate.weight"].T
    probs_ne = softmax(router_logits_ne)
    k = cfg["num_experts_per_tok"]
    top_idx_nk = np.argsort(-probs_ne, axis=-1, kind="stable")[:, :k]
    top_w_nk = np.take_along_axis(probs_ne, top_idx_nk, axis=-1)
    if cfg["norm_topk_prob"]:
        top_w_nk = top_w_nk / top_w_nk.sum(-1, keepdims=True)
    out_nd = np.zeros_like(x_nd)
    for e in range(cfg["num_local_experts"]):
        rows, slot = np.nonzero(top_idx_nk == e)
        if rows.size == 0:
            continue
        xe = x_nd[rows]
        h = silu(xe @ w[f"{prefix}.experts.{e}.gate_proj.weight"].T) * (
            xe @ w[f"{prefix}.experts.{e}.up_proj.weight"].T
        )
        out_nd[rows] += (h @ w[f"{prefix}.experts.{e}.down_proj.weight"].T) * top_w_nk[rows, slot][:, None]
    return out_nd, router_logits_ne


def is_moe_layer(cfg, layer):
    return (
        cfg.get("num_local_experts", 0) > 0
        and layer not in cfg.get("mlp_only_layers", [])
        and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0
    )


def forward(cfg, w, ids_bt, mask_bt, pos_bt):
    """Returns (logits [B,T,V], router logits per MoE layer [B*T, E])."""
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    eps = cfg["rms_norm_eps"]
    qwen3 = cfg["model_type"].startswith("qwen3")
    inv_freq, attn_factor = rope_inv_freq_and_scale(cfg, head_dim)
    angles_btf = pos_bt[..., None].astype(np.float64) * inv_freq
    cos_btd = np.cos(np.concatenate([angles_btf] * 2, -1)) * attn_factor
    sin_btd = np.sin(np.concatenate([angles_btf] * 2, -1)) * attn_factor
    b, t = ids_bt.shape
    causal_tt = np.tril(np.ones((t, t), bool))
    allowed_btt = causal_tt[None] & (mask_bt[:, None, :] == 1)
    x = w["model.embed_tokens.weight"][ids_bt]
    router_logits = []
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        h = rms_norm(x, w[f"{p}.input_layernorm.weight"], eps)
        proj = lambda name: h @ w[f"{p}.self_attn.{name}.weight"].T + w.get(f"{p}.self_attn.{name}.bias", 0.0)
        q = proj("q_proj").reshape(b, t, n_heads, head_dim)
        k = proj("k_proj").reshape(b, t, n_kv, head_dim)
        v = proj("v_proj").reshape(b, t, n_kv, head_dim)
        if qwen3:  # per-head RMSNorm over head_dim, before RoPE
            q = rms_norm(q, w[f"{p}.self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[f"{p}.self_attn.k_norm.weight"], eps)
        q, k = rotate(q, cos_btd, sin_btd), rotate(k, cos_btd, sin_btd)
        group = n_heads // n_kv  # query head h reads kv head h // group
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
        scores_bhqk = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores_bhqk = np.where(allowed_btt[:, None], scores_bhqk, -np.inf)
        scores_bhqk = np.where(allowed_btt[:, None].any(-1, keepdims=True), scores_bhqk, 0.0)  # pad rows
        attn = np.einsum("bhqk,bkhd->bqhd", softmax(scores_bhqk), v).reshape(b, t, n_heads * head_dim)
        x = x + attn @ w[f"{p}.self_attn.o_proj.weight"].T
        h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
        if is_moe_layer(cfg, layer):
            out, logits_ne = moe_block(cfg, w, f"{p}.mlp", h.reshape(b * t, -1))
            x = x + out.reshape(b, t, -1)
            router_logits.append(logits_ne)
        else:
            mlp = lambda name: w[f"{p}.mlp.{name}.weight"]
            x = x + (silu(h @ mlp("gate_proj").T) * (h @ mlp("up_proj").T)) @ mlp("down_proj").T
    x = rms_norm(x, w["model.norm.weight"], eps)
    lm_head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ lm_head.T, router_logits


def load_balancing_loss(router_logits, mask_bt, num_experts, top_k):
    """Switch-style aux loss pooled over all MoE layers and real tokens (transformers' formula)."""
    flat_mask = mask_bt.reshape(-1).astype(np.float64)
    counts_e = np.zeros(num_experts)
    prob_sum_e = np.zeros(num_experts)
    rows = 0.0
    for logits_ne in router_logits:
        probs_ne = softmax(logits_ne)
        top_nk = np.argsort(-probs_ne, axis=-1, kind="stable")[:, :top_k]
        np.add.at(counts_e, top_nk.reshape(-1), np.repeat(flat_mask, top_k))
        prob_sum_e += (probs_ne * flat_mask[:, None]).sum(0)
        rows += flat_mask.sum()
    return num_experts * np.sum((counts_e / rows) * (prob_sum_e / rows))


def check(name: str) -> None:
    path = os.path.join(GOLDEN_DIR, name)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    w = {k: v.astype(np.float64) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    g = np.load(os.path.join(path, "golden.npz"))
    positions = np.clip(np.cumsum(g["attention_mask"], -1) - 1, 0, None)
    assert np.array_equal(positions, g["position_ids"])
    logits, _ = forward(cfg, w, g["input_ids"], g["attention_mask"], positions)
    valid = g["attention_mask"] == 1
    err = np.abs(logits - g["logits"])[valid].max()
    report = [f"logits max abs err {err:.2e}"]
    assert err < 1e-4, (name, err)
    gen_mask = np.concatenate([g["gen_attention_mask"], np.ones_like(g["gen_new_ids"])], 1)
    gen_logits, _ = forward(cfg, w, g["gen_output_ids"], gen_mask, np.clip(np.cumsum(gen_mask, -1) - 1, 0, None))
    prompt_len = g["gen_prompt_ids"].shape[1]
    greedy = gen_logits[:, prompt_len - 1 : -1].argmax(-1)
    assert np.array_equal(greedy, g["gen_new_ids"]), name
    report.append("greedy tokens equal")
    if "sft_loss" in g.files:
        ids, mask, labels = g["sft_input_ids"], g["sft_attention_mask"], g["sft_labels"]
        logits, router = forward(cfg, w, ids, mask, g["sft_position_ids"])
        logp = (
            logits[:, :-1]
            - np.log(np.exp(logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits[:, :-1].max(-1, keepdims=True)
        )
        target = labels[:, 1:]
        token_loss = np.where(
            target != -100, -np.take_along_axis(logp, np.maximum(target, 0)[..., None], -1)[..., 0], 0
        )
        assert np.abs(token_loss - g["sft_token_loss"]).max() < 1e-4, name
        assert abs(token_loss.sum() / (target != -100).sum() - g["sft_loss"]) < 1e-5, name
        report.append("sft token loss equal")
        if router:
            aux = load_balancing_loss(router, mask, cfg["num_local_experts"], cfg["num_experts_per_tok"])
            aux_all = load_balancing_loss(
                router, np.ones_like(mask), cfg["num_local_experts"], cfg["num_experts_per_tok"]
            )
            assert abs(aux - g["router_aux_loss"]) < 1e-5 and abs(aux_all - g["router_aux_loss_unmasked"]) < 1e-5, name
            report.append(f"router aux loss equal ({aux:.6f}, unmasked {aux_all:.6f})")
    print(f"{name}: " + ", ".join(report))


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(
        d for d in os.listdir(GOLDEN_DIR) if os.path.isfile(os.path.join(GOLDEN_DIR, d, "golden.npz"))
    )
    for name in names:
        check(name)
