"""Live parity against transformers (skipped when transformers/torch are not installed)."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from polaris_jax.models import load_hf, logits  # noqa: E402
from tests.models.hf_factory import hf_logits, make_hf_model  # noqa: E402

IDS = np.array(
    [[5, 17, 99, 3, 42, 7, 8, 120, 11, 64], [0, 0, 0, 9, 150, 33, 2, 71, 19, 5], [0, 0, 0, 0, 0, 0, 1, 2, 3, 4]],
    np.int32,
)
MASK = (np.arange(10)[None] >= np.array([[0], [3], [6]])).astype(np.int32)

CASES = {
    "qwen2": ("qwen2", {}),
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True}),
    "qwen3_yarn": (
        "qwen3",
        {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}},
    ),
    "qwen3_moe_sparse_step": ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [], "norm_topk_prob": False}),
    "qwen3_moe_mlp_only": ("qwen3_moe", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_live_logits(case, tmp_path):
    arch, overrides = CASES[case]
    model = make_hf_model(arch, **overrides)
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path, dtype="float32")
    expected = hf_logits(model, IDS, MASK)
    ours = np.asarray(logits(config, params, IDS, MASK))
    err = np.abs(ours - expected)[MASK.astype(bool)]
    assert err.max() <= 1e-4, f"{case}: max abs error {err.max():.3g}"
