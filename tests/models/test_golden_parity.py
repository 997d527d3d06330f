"""fp32 logits against transformers' golden logits (tests/golden/make_golden.py made them)."""

import numpy as np
import pytest

from polaris_jax.models import load_hf, logits
from tests.conftest import GOLDEN_DIR

MODELS = ["qwen2", "qwen3_tied", "qwen3_untied", "qwen3_moe", "qwen3_moe_nonorm", "qwen3_yarn"]


# flash: blockwise attention (models.flash_attention) in blocks small enough to split every row.
IMPLS = {
    "dense": dict(attention_impl="dense"),
    "flash": dict(attention_impl="flash", attention_block_q=3, attention_block_kv=5),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(name, impl):
    golden = np.load(GOLDEN_DIR / name / "golden.npz")
    config, params = load_hf(GOLDEN_DIR / name, dtype="float32", config_overrides=IMPLS[impl])
    mask = golden["attention_mask"]
    assert (mask == 0).any(axis=1).sum() >= 2, "golden batch must hold left-padded rows"
    ours = np.asarray(logits(config, params, golden["input_ids"], mask))
    assert ours.shape == golden["logits"].shape and ours.dtype == np.float32
    assert golden["input_ids"].shape[1] > 2 * IMPLS["flash"]["attention_block_kv"]
    real = mask.astype(bool)
    err = np.abs(ours - golden["logits"])[real]
    assert err.max() <= 1e-4, f"{name}: max abs error {err.max():.3g}"


def test_goldens_cover_the_required_architectures():
    import json

    archs = {json.loads((GOLDEN_DIR / n / "config.json").read_text())["architectures"][0] for n in MODELS}
    assert archs == {"Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"}
    tied = {n: json.loads((GOLDEN_DIR / n / "config.json").read_text())["tie_word_embeddings"] for n in MODELS}
    assert tied["qwen3_tied"] and not tied["qwen3_untied"]
