"""Greedy output equals transformers' generate() token for token (golden files and a live model)."""

import numpy as np
import pytest

from polaris_jax.sampling import Buckets, generate
from tests.sampling.conftest import PARITY_MODELS, golden

# One cache bucket holds prompt + 64 new tokens: one decode program per model keeps the suite fast
# (growing through buckets is covered in test_generate.py and test_recompile.py).
ONE_BUCKET = Buckets(min_cache_length=128)


# pack_weights: models.cpu_gemm's kernel (the CPU default for fp32) or XLA's dots.
@pytest.mark.parametrize("pack_weights", [True, False], ids=["packed", "xla_dots"])
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_greedy_matches_golden_generate(name, pack_weights):
    model = golden(name)
    assert len({len(p) for p in model.prompts}) == len(model.prompts), "golden prompts should be ragged"
    out = generate(
        model.config,
        model.params,
        model.prompts,
        max_new_tokens=len(model.new_ids[0]),
        temperature=0.0,
        buckets=ONE_BUCKET,
        pack_weights=pack_weights,
    )
    assert len(model.new_ids[0]) >= 64
    for row, (ours, expected) in enumerate(zip(out.tokens, model.new_ids)):
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
        assert ours == expected, f"{name} row {row}: first mismatch at token {first_diff}"
    assert out.finish_reasons == ["length"] * len(model.prompts)


def _tiny_hf_qwen3(seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=192,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # large random weights so every component shows in the logits
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.5 * noise / p.shape[-1] ** 0.5)
    return model


def test_greedy_matches_live_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from polaris_jax.models import load_hf

    model = _tiny_hf_qwen3(seed=7)
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path, dtype="float32")
    rng = np.random.RandomState(7)
    prompts = [rng.randint(1, 192, size=length).tolist() for length in (11, 4, 7, 1)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's thread pool stalls badly when the cores are shared
    with torch.no_grad():
        expected = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=72, do_sample=False, eos_token_id=None, pad_token_id=0
        )[:, width:].tolist()
    torch.set_num_threads(threads)
    out = generate(config, params, prompts, max_new_tokens=72, temperature=0.0, buckets=ONE_BUCKET)
    assert out.tokens == expected
