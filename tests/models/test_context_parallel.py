"""Context parallelism (models.context_parallel): a 4K-token packed row split over sequence=4 of 8 fake CPU
devices gives the SFT loss and gradients of the unsplit model on one device, for Ulysses and for ring
attention, with segment ids (several documents and padding per row), and each device does an eighth of the
matmul work (the chunked loss computes each device's own positions, not every chunk of its rows). Bad
splits are refused before compile with a message naming the problem."""

from __future__ import annotations

import pytest

from polaris_jax.models import context_parallel
from polaris_jax.models.config import ConfigError, ModelConfig
from tests.fake_devices import run_on_8_devices

LENGTH = 4096


def packed_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
    """Rows of several documents each (positions restart per document) and trailing padding."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (rows, length)).astype(np.int32)
    segments = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(64, length - 64), 3, replace=False))
        bounds = [0, *cuts.tolist(), length - 37 * (r + 1)]  # the last stretch is padding
        for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            segments[r, start:end] = doc + 1
            positions[r, start:end] = np.arange(end - start)
    targets = np.roll(tokens, -1, axis=1)
    loss_mask = (segments != 0) & (np.roll(segments, -1, axis=1) == segments)
    return dict(
        tokens_bt=tokens, positions_bt=positions, segment_ids_bt=segments, targets_bt=targets, loss_mask_bt=loss_mask
    )


def worker() -> dict:
    """Runs in the subprocess with 8 fake devices."""
    import jax
    import numpy as np

    from polaris_jax.models import init_params, make_mesh, param_shardings
    from polaris_jax.models.sharding import DEFAULT_RULES, activation_sharding
    from polaris_jax.tools.hlo_flops import matmul_flops
    from polaris_jax.train import losses, partitioning

    results = {}
    # 384-position loss chunks: each device's 1,024 positions end in a padded chunk.
    settings = losses.LossSettings(chunk_size=384)
    batch = packed_batch(2, LENGTH, 256)
    for scheme in ("ulysses", "ring"):
        config = ModelConfig.tiny(
            num_heads=8,
            num_kv_heads=4,
            vocab_size=8192,  # the unembedding is then ~a third of the matmul work
            attention_impl="flash",
            attention_block_q=256,
            attention_block_kv=256,
        ).replace(sequence_parallelism=scheme)
        params = init_params(config, jax.random.key(0), std=0.05)
        loss_fn = lambda p, b, config=config: losses.sft_loss(config, p, b, settings)[0]
        reference_compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params, batch).compile()
        reference = reference_compiled(params, batch)

        mesh = make_mesh({"fsdp": 2, "sequence": 4})

        def split(p, b, mesh=mesh, loss_fn=loss_fn):
            with activation_sharding(mesh, DEFAULT_RULES):
                return jax.value_and_grad(loss_fn)(p, b)

        sharded_params = jax.device_put(params, param_shardings(config, mesh))
        batch_sharding = partitioning.batch_shardings(mesh, DEFAULT_RULES, (2, LENGTH))
        assert tuple(batch_sharding["tokens_bt"].spec) == ("fsdp", "sequence"), batch_sharding["tokens_bt"].spec
        sharded_batch = {k: jax.device_put(v, batch_sharding[k]) for k, v in batch.items()}
        compiled = jax.jit(split).lower(sharded_params, sharded_batch).compile()
        hlo = compiled.as_text()
        collective = "all-to-all" if scheme == "ulysses" else "collective-permute"
        loss, grads = compiled(sharded_params, sharded_batch)
        flat_ref, flat = jax.tree.leaves(reference[1]), jax.tree.leaves(grads)
        results[scheme] = dict(
            loss=float(loss),
            reference_loss=float(reference[0]),
            grad_err=max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(flat, flat_ref)),
            grad_scale=max(float(np.max(np.abs(np.asarray(b)))) for b in flat_ref),
            uses_collective=collective in hlo,
            matmul_share=matmul_flops(hlo) * 8 / matmul_flops(reference_compiled.as_text()),
        )
        try:  # a row length SP does not divide: refused at trace time
            bad = {k: v[:, : LENGTH - 2] for k, v in batch.items()}
            jax.jit(split).lower(sharded_params, bad)
            results[scheme]["bad_length_error"] = ""
        except ConfigError as e:
            results[scheme]["bad_length_error"] = str(e)
    return results


@pytest.fixture(scope="module")
def split_results() -> dict:
    return run_on_8_devices("tests.models.test_context_parallel", "worker()")


@pytest.mark.slow  # ~45 s of 8-device compiles; CI's slow tier runs it
@pytest.mark.parametrize("scheme", ["ulysses", "ring"])
def test_sequence_split_equals_one_device(split_results, scheme):
    r = split_results[scheme]
    assert r["uses_collective"], r
    assert abs(r["loss"] - r["reference_loss"]) <= 1e-5 * abs(r["reference_loss"]), r
    assert r["grad_err"] <= 1e-4 * r["grad_scale"], r
    if scheme == "ulysses":  # flash attention on both sides: its uncounted inner loops cancel (tools.hlo_flops)
        # An eighth of the work per device (1.0); every device computing every loss chunk of its rows made it 3.2.
        assert 0.9 <= r["matmul_share"] <= 1.1, r


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["ulysses", "ring"])
def test_row_length_not_dividing_is_refused_before_compile(split_results, scheme):
    message = split_results[scheme]["bad_length_error"]
    assert "4094 tokens" in message and "multiple of" in message, message


def test_ulysses_needs_sp_to_divide_the_heads():
    config = ModelConfig.tiny(num_heads=4, num_kv_heads=2)
    with pytest.raises(ConfigError, match="2 key/value heads"):
        context_parallel.check(config, 4096, 4)
    context_parallel.check(config.replace(sequence_parallelism="ring"), 4096, 4)  # ring takes any head count


def test_zigzag_order_balances_causal_work():
    order = context_parallel.zigzag_order(16, 4)
    assert sorted(order.tolist()) == list(range(16))
    # each device's 4 tokens: chunk r and chunk 7 - r; causal work (sum of positions + 1) is equal
    work = [int(sum(order[4 * r : 4 * r + 4] + 1)) for r in range(4)]
    assert len(set(work)) == 1, work


def test_unknown_scheme_is_refused():
    with pytest.raises(ConfigError, match="sequence_parallelism='tree'"):
        ModelConfig.tiny(sequence_parallelism="tree")
