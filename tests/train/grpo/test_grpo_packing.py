"""Packed GRPO updates (`algo.pack_tokens`): the same loss, gradients and metrics as the padded update, for
every aggregation mode and for sequence-level (GSPO) and token-level losses, with minibatches, microbatches
and a second iteration that sees the ratio; and the packer keeps every token and wastes few rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from polaris_jax.train.grpo import step as grpo_step
from polaris_jax.train.grpo.packing import pack_update_batch
from tests.train.grpo import grpo_helpers

ROWS = 16
ROW_TOKENS = grpo_helpers.PROMPT + grpo_helpers.RESPONSE  # the longest sequence


def _batch():
    batch = grpo_helpers.host_update_batch(7, rows=ROWS)
    batch.mask_br[3, 5:] = 0.0  # an overlong-filtered tail
    batch.mask_br[6] = 0.0  # a response with no token in the loss
    return batch


def _run(settings, batch):
    update, state, shardings, _ = grpo_helpers.make_update(settings, rows=ROWS, lr=1.0, sgd=True)
    if settings.pack_tokens:
        batch = pack_update_batch(
            batch,
            row_tokens=settings.pack_tokens,
            minibatches=settings.minibatches,
            microbatches=settings.micro_rows or settings.microbatches,
        )
    state, metrics = update(state, grpo_step.put_update_batch(batch, shardings), jax.random.PRNGKey(0), None)
    return jax.device_get(state["params"]), jax.device_get(metrics)


@pytest.mark.parametrize(
    "algo",
    [
        dict(loss_agg_mode="token-mean"),
        # The rest in the slow tier (make test-slow, which CI runs): ~15 s of compiles each.
        pytest.param(dict(loss_agg_mode="seq-mean-token-mean", microbatches=2), marks=pytest.mark.slow),
        pytest.param(
            dict(loss_agg_mode="seq-mean-token-sum-norm", minibatches=2, microbatches=2), marks=pytest.mark.slow
        ),
        pytest.param(dict(loss_agg_mode="token-mean", policy_loss="gspo", minibatches=2), marks=pytest.mark.slow),
        pytest.param(
            dict(loss_agg_mode="token-mean", policy_loss="cispo", num_iterations=2, off_policy="tis", microbatches=2),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["token-mean", "seq-mean-token-mean", "dr-grpo", "gspo", "cispo-tis-mu2"],
)
def test_packed_update_equals_the_padded_one(algo):
    batch = _batch()
    padded_params, padded = _run(grpo_helpers.settings(**algo), batch)
    packed_params, packed = _run(grpo_helpers.settings(pack_tokens=ROW_TOKENS, **algo), batch)
    keys = ["loss", "grad_norm", "entropy", "sampler_logprob_gap", "approx_kl"]
    if algo["loss_agg_mode"] == "token-mean" or algo.get("microbatches", 1) == 1:
        # Metrics are averaged over microbatches by token share: exact for token means only, so a
        # sequence-level metric depends on which responses share a microbatch (in both layouts).
        keys.append("policy_loss")
    for key in keys:
        np.testing.assert_allclose(packed[key], padded[key], rtol=2e-4, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), packed_params, padded_params)


@pytest.mark.slow  # ~17 s (make test budget); CI runs it
def test_a_token_budget_per_micro_pass_equals_the_padded_update():
    """algo.micro_tokens = 3 x pack_tokens: micro passes of 3 packed rows, as many as the batch's K needs."""
    batch = _batch()
    algo = dict(loss_agg_mode="seq-mean-token-sum-norm", minibatches=2)
    padded_params, padded = _run(grpo_helpers.settings(**algo), batch)
    settings = grpo_helpers.settings(pack_tokens=ROW_TOKENS, micro_tokens=3 * ROW_TOKENS, **algo)
    assert settings.micro_rows == 3
    packed_params, packed = _run(settings, batch)
    for key in ["loss", "grad_norm", "entropy", "sampler_logprob_gap"]:
        np.testing.assert_allclose(packed[key], padded[key], rtol=2e-4, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), packed_params, padded_params)


def test_the_packer_keeps_every_token_and_fills_its_rows():
    batch = _batch()
    row_tokens = 2 * ROW_TOKENS
    packed = pack_update_batch(batch, row_tokens=row_tokens, minibatches=2, microbatches=1)
    minibatches, rows, length = packed.tokens_mkl.shape
    assert (minibatches, length) == (2, row_tokens)
    real = int(batch.segment_ids_bt.sum())
    assert int((packed.segment_ids_mkl > 0).sum()) == real
    assert real / (rows * minibatches * row_tokens) > 0.6  # the padded batch holds real tokens at about half
    # Every response token is predicted from its own sequence's previous position, and targets agree.
    for b in range(ROWS):
        m, n = b % 2, int(batch.segment_ids_bt[b, grpo_helpers.PROMPT :].sum())
        index = packed.flat_index_br[b, :n]
        row, column = index // row_tokens, index % row_tokens
        np.testing.assert_array_equal(packed.targets_mkl[m, row, column], batch.response_br[b, :n])
        np.testing.assert_array_equal(packed.tokens_mkl[m, row, column + 1], batch.response_br[b, :n])
        assert (packed.flat_index_br[b, n:] == -1).all()
    with pytest.raises(ValueError, match="does not fit algo.pack_tokens=8"):
        pack_update_batch(batch, row_tokens=8, minibatches=1, microbatches=1)
