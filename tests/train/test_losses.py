"""SFT loss and gradients against transformers (golden files), chunking, z-loss, entropy and packing."""

import jax
import numpy as np
import pytest

from polaris_jax.models import ModelConfig, forward, init_params, load_hf
from polaris_jax.train import losses
from tests.conftest import GOLDEN_DIR
from tests.train import sft_helpers

NO_AUX = losses.LossSettings(chunk_size=5, router_aux_coef=0.0)  # 16 positions: 4 chunks, last one padded


def _golden_outputs(config, params, batch, aux_coef: float):
    """Everything the golden tests compare, from one compiled function per model."""
    with_aux = losses.LossSettings(chunk_size=16, router_aux_coef=aux_coef)

    @jax.jit
    def run(params, batch):
        logprobs_bt = losses.token_stats(
            config,
            params,
            batch["tokens_bt"],
            batch["positions_bt"],
            batch["segment_ids_bt"],
            batch["targets_bt"],
            chunk_size=5,
        )["logprobs"]
        loss, grads = jax.value_and_grad(lambda p: losses.sft_loss(config, p, batch, NO_AUX)[0])(params)
        loss_with_aux, terms = losses.sft_loss(config, params, batch, with_aux)
        aux_grads = jax.grad(lambda p: losses.sft_loss(config, p, batch, with_aux)[1]["router_aux_loss"])(params)
        return dict(
            logprobs_bt=logprobs_bt,
            loss=loss,
            grads=grads,
            loss_with_aux=loss_with_aux,
            router_aux_loss=terms["router_aux_loss"],
            aux_grads=aux_grads,
        )

    return jax.device_get(run(params, batch))


@pytest.fixture(scope="module", params=["qwen3_tied", "qwen3_moe"])
def golden_case(request):
    name = request.param
    config, params = load_hf(GOLDEN_DIR / name, dtype="float32")
    golden = np.load(GOLDEN_DIR / name / "golden.npz")
    grads = np.load(GOLDEN_DIR / name / "sft_grads.npz")
    batch = sft_helpers.golden_sft_batch(golden)
    coef = float(golden["router_aux_loss_coef"]) if "router_aux_loss_coef" in golden else 0.0
    return name, config, golden, grads, batch, _golden_outputs(config, params, batch, coef)


def test_token_loss_matches_transformers(golden_case):
    name, _, golden, _, batch, out = golden_case
    ours_bt = (-out["logprobs_bt"] * batch["loss_mask_bt"])[:, :-1]  # transformers' loss has T-1 positions
    np.testing.assert_allclose(ours_bt, golden["sft_token_loss"], atol=1e-4, err_msg=name)
    np.testing.assert_allclose(float(out["loss"]), float(golden["sft_loss"]), rtol=1e-5, err_msg=name)
    assert int(batch["loss_mask_bt"].sum()) == int(golden["sft_num_tokens"])


def test_gradients_match_transformers(golden_case):
    name, config, _, grads, _, out = golden_case
    reference = sft_helpers.hf_tree(config, {k[len("grad/") :]: grads[k] for k in grads if k.startswith("grad/")})
    flat_ours = jax.tree_util.tree_leaves_with_path(out["grads"])
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(reference))
    assert len(flat_ours) == len(flat_ref)
    for path, g in flat_ours:
        ref = flat_ref[path]
        scale = np.abs(ref).max()
        assert scale > 0, (name, path)
        err = np.abs(np.asarray(g) - ref).max() / scale
        assert err < 1e-4, f"{name} {jax.tree_util.keystr(path)}: relative error {err:.2e}"


def test_router_aux_loss_and_its_gradient_match_transformers(golden_case):
    name, config, golden, grads, _, out = golden_case
    if not config.is_moe:
        assert float(out["router_aux_loss"]) == 0.0
        return
    np.testing.assert_allclose(float(out["router_aux_loss"]), float(golden["router_aux_loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_with_aux"]), float(golden["sft_loss_with_aux"]), rtol=1e-5)
    # d(aux)/d(router weights) against transformers' gradient of the unscaled aux loss.
    moe_layers = [i for i in range(config.num_layers) if config.layer_is_moe(i)]
    for j, layer in enumerate(moe_layers):
        ref = grads[f"grad_router_aux/model.layers.{layer}.mlp.gate.weight"].T
        np.testing.assert_allclose(out["aux_grads"]["moe_layers"]["router"][j], ref, atol=1e-5 * np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny():
    config = ModelConfig.tiny(vocab_size=96)
    params = jax.jit(lambda key: init_params(config, key, std=0.3))(jax.random.PRNGKey(0))
    loss = jax.jit(lambda p, b, s: losses.sft_loss(config, p, b, s)[0], static_argnums=2)
    return config, params, loss


def _full_logits(config, params, batch):
    logits_btv, _ = jax.jit(
        lambda p: forward(config, p, batch["tokens_bt"], batch["positions_bt"], segment_ids_bt=batch["segment_ids_bt"])
    )(params)
    return np.asarray(logits_btv, np.float64)


@pytest.mark.parametrize("chunk_size", [7, 64])  # 7: the last chunk is padded; 64: one chunk
def test_chunked_stats_equal_full_logits_numpy(tiny, chunk_size):
    config, params, _ = tiny
    batch = sft_helpers.random_packed_batch(1, batch=2, length=24, vocab=96)
    logits = _full_logits(config, params, batch) / 0.7
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp_ref = np.take_along_axis(logits, batch["targets_bt"][..., None], -1)[..., 0] - lse
    probs = np.exp(logits - lse[..., None])
    entropy_ref = -(probs * np.log(probs)).sum(-1)
    stats = jax.jit(
        lambda p: losses.token_stats(
            config,
            p,
            batch["tokens_bt"],
            batch["positions_bt"],
            batch["segment_ids_bt"],
            batch["targets_bt"],
            chunk_size=chunk_size,
            temperature=0.7,
            with_entropy=True,
        )
    )(params)
    np.testing.assert_allclose(np.asarray(stats["logprobs"]), logp_ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(stats["entropy"]), entropy_ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(stats["lse"]), lse, atol=2e-5)


def test_z_loss_is_mean_squared_log_normaliser(tiny):
    config, params, loss_fn = tiny
    batch = sft_helpers.random_packed_batch(2, batch=2, length=24, vocab=96)
    logits = _full_logits(config, params, batch)
    lse = np.log(np.exp(logits).sum(-1))
    mask = batch["loss_mask_bt"].astype(np.float64)
    logp = np.take_along_axis(logits, batch["targets_bt"][..., None], -1)[..., 0] - lse
    expected = (-(logp * mask).sum() + 1e-2 * (lse**2 * mask).sum()) / mask.sum()
    loss = loss_fn(params, batch, losses.LossSettings(chunk_size=8, z_loss_coef=1e-2))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_packed_loss_equals_token_weighted_unpacked_losses(tiny):
    config, params, loss_fn = tiny
    rng = np.random.default_rng(4)
    sequences = sft_helpers.random_sequences(rng, [9, 5, 12, 7, 3], vocab=96)
    packed = sft_helpers.packed_batch([sequences[:3], sequences[3:]], length=28)
    assert packed["segment_ids_bt"].max() == 3
    packed_loss = loss_fn(params, packed, losses.LossSettings(chunk_size=8))
    singles = [sft_helpers.packed_batch([[s]], length=16) for s in sequences]
    per_sequence = [
        (float(loss_fn(params, b, losses.LossSettings(chunk_size=8))), int(b["loss_mask_bt"].sum())) for b in singles
    ]
    weighted = sum(loss * n for loss, n in per_sequence) / sum(n for _, n in per_sequence)
    np.testing.assert_allclose(float(packed_loss), weighted, rtol=1e-5)
    assert sum(n for _, n in per_sequence) == int(packed["loss_mask_bt"].sum())


def test_loss_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="chunk_size"):
        losses.LossSettings(chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        losses.LossSettings(temperature=0.0)
