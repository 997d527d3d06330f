"""What the hot programs become on TPU and GPU, checked on a CPU-only host with `jax.export`: the SFT step,
the GRPO update and the engine's decode step each contain their platform's kernel (Mosaic splash and paged
attention, Triton paged attention, ragged dot for MoE), and none of it when lowered for CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import cases
from polaris_jax.models import attention_kernels
from polaris_jax.models.config import ModelConfig

# head_dim 128 and bf16: the shapes every kernel takes (TPU lanes, Triton powers of two, cuDNN dtypes).
DENSE = ModelConfig.tiny(head_dim=128, compute_dtype="bfloat16")
MOE = ModelConfig.tiny(
    arch="qwen3_moe",
    head_dim=128,
    compute_dtype="bfloat16",
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
)
_CUDNN_REASON = attention_kernels.cudnn_unfit(jnp.zeros((1, 8, 2, 128), jnp.bfloat16), None)
needs_cudnn = pytest.mark.skipif(
    bool(_CUDNN_REASON),
    reason=f"cuda lowering of cuDNN attention: {_CUDNN_REASON} (jax asks the plugin for the cuDNN version "
    "while tracing); `make test-cuda-lowering` installs both in a side folder and runs this",
)


@functools.cache
def _case(name: str) -> cases.Case:
    if name == "sft":
        return cases.sft_case(DENSE, rows=2, length=256)
    if name == "sft_moe":
        return cases.sft_case(MOE, rows=2, length=256)
    if name == "grpo":
        return cases.grpo_case(DENSE, cases.update_batch(2, 64, 192, DENSE.vocab_size))
    return cases.decode_case(DENSE, rows=2, context=40)


@pytest.mark.parametrize(
    "name,platform,want",
    [
        ("sft", "tpu", {"mosaic"}),  # splash forward and backward
        ("grpo", "tpu", {"mosaic"}),
        ("decode", "tpu", {"mosaic"}),  # paged attention
        ("sft_moe", "tpu", {"mosaic", "ragged_dot"}),
        ("decode", "cuda", {"triton"}),
        pytest.param("sft", "cuda", {"cudnn"}, marks=needs_cudnn),
        pytest.param("grpo", "cuda", {"cudnn"}, marks=needs_cudnn),
        ("sft", "cpu", set()),
        ("grpo", "cpu", set()),
        ("decode", "cpu", set()),
        ("sft_moe", "cpu", set()),
    ],
)
def test_each_program_exports_with_its_platforms_kernels(name, platform, want):
    exported = _case(name).export((platform,))
    assert exported.platforms == (platform,)
    assert cases.kernels_in(exported.mlir_module()) == want


@pytest.mark.slow
def test_one_artifact_for_three_platforms_runs_here_as_the_jitted_step():
    """Without Pallas calls (JAX lowers a Pallas call for every platform of a multi-platform export, and
    refuses), one export serves cpu, tpu and cuda, and its cpu branch computes what the jitted step does."""
    config = ModelConfig.tiny(attention_impl="flash")
    case = cases.sft_case(config, rows=2, length=64)
    exported = jax.export.export(case.fn, platforms=("cpu", "tpu", "cuda"))(*case.args)
    state, batch, rng = case.args
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the jitted step donates its state
    _, want = case.fn(copy(state), batch, rng)
    _, got = exported.call(copy(state), batch, rng)
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(got["grad_norm"]), float(want["grad_norm"]), rtol=1e-5)


def test_bf16_training_accumulates_every_matmul_in_fp32():
    """Mixed precision as the field runs it: bf16 weights and activations into every matmul of the TPU SFT
    step (forward and backward), fp32 out of every one (accumulation), and an fp32 loss."""
    config = ModelConfig.tiny(head_dim=128, compute_dtype="bfloat16", param_dtype="bfloat16")
    case = cases.sft_case(config, rows=2, length=256)
    text = case.fn.trace(*case.args).lower(lowering_platforms=("tpu",)).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    operands = [line.rsplit(" : (", 1)[1].split(")")[0] for line in dots]
    results = [line.rsplit("->", 1)[1] for line in dots]
    assert dots and all(r.strip().endswith("xf32>") for r in results), [r for r in results if "f32" not in r]
    bf16_in = sum("bf16" in ops for ops in operands)
    assert bf16_in >= len(dots) - 1, operands  # all but splash backward's fp32 row term, sum(dO * O) over head_dim
    _, metrics = jax.eval_shape(case.fn, *case.args)
    assert metrics["loss"].dtype == jnp.float32
