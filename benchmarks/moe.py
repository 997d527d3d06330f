"""MoE layer: the grouped (tiled) expert path against the ragged_dot path, and expert parallelism's costs.

    python benchmarks/moe.py [--tokens 1024 --repeats 3]

Prints one JSON object per line:
- "cpu_grouped": forward + backward of one MoE layer (64 experts, top-8; hidden 256, expert mlp 128, float32)
  on one CPU device: tokens/s of the dropless grouped path moe_matmul="tiled" and of "ragged_dot" (XLA:CPU
  expands ragged_dot into a masked dense dot per expert), their ratio, and tokens/s of capacity factor 1.25.
- "ep4" rows (one per capacity factor; 0 = dropless): the same layer on expert=4 of 4 fake CPU devices,
  compiled forward + backward: matmul FLOPs per device (tools.hlo_flops) against the active-parameter
  figure 3 x 2 x tokens x (k x 3 x D x F + D x E), and the bytes that leave a device in all-to-alls per
  token against the analytic figure 2 (there and back) x 2 (forward and backward) x k x D x 4 bytes x
  (EP - 1) / EP (uniform routing), and the compiled step's temporary bytes. The last row is dropless with
  `moe_dispatch_tokens` = a quarter of each device's tokens: its buffers a quarter, for a rematerialised
  forward of the experts (more FLOPs; its all-to-all bytes are not counted: they sit in a loop body).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import interleaved_best, timed  # noqa: E402
from polaris_jax.models import ModelConfig, make_mesh  # noqa: E402
from polaris_jax.models.moe import moe_block  # noqa: E402
from polaris_jax.models.sharding import DEFAULT_RULES, activation_sharding  # noqa: E402
from polaris_jax.tools.hlo_flops import matmul_flops  # noqa: E402

EXPERTS, TOP_K, HIDDEN, EXPERT_MLP = 64, 8, 256, 128
_ALL_TO_ALL = re.compile(r"=\s*(\([^)]*\)|\w+\[[\d,]*\]\S*)\s+all-to-all\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2}


def _config(kernel: str, capacity_factor: float = 0.0, dispatch_tokens: int = 0) -> ModelConfig:
    return ModelConfig.tiny(
        "qwen3_moe",
        hidden_size=HIDDEN,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=EXPERT_MLP,
        moe_matmul=kernel,
        moe_capacity_factor=capacity_factor,
        moe_dispatch_tokens=dispatch_tokens,
    )


def _layer(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-2]), jnp.float32)
    return dict(
        router=normal(HIDDEN, EXPERTS),
        gate=normal(EXPERTS, HIDDEN, EXPERT_MLP),
        up=normal(EXPERTS, HIDDEN, EXPERT_MLP),
        down=normal(EXPERTS, EXPERT_MLP, HIDDEN),
    )


def _loss_and_grad(config):
    def loss(layer, x_btd):
        out, _ = moe_block(config, layer, x_btd, jnp.ones(x_btd.shape[:2], bool))
        return jnp.sum(out * out)

    return jax.value_and_grad(loss, argnums=(0, 1))


def cpu_grouped(tokens: int, repeats: int) -> dict:
    layer = _layer()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, tokens, HIDDEN)), jnp.float32)
    configs = {"tiled": _config("tiled"), "ragged_dot": _config("ragged_dot"), "capacity_1.25": _config("auto", 1.25)}
    steps = {name: jax.jit(_loss_and_grad(config)) for name, config in configs.items()}
    for step in steps.values():
        jax.block_until_ready(step(layer, x))
    best = interleaved_best(
        {k: (lambda s=s: timed(lambda: jax.block_until_ready(s(layer, x)))) for k, s in steps.items()}, repeats
    )
    rates = {k: tokens / v for k, v in best.items()}
    return dict(
        row="cpu_grouped",
        tokens=tokens,
        experts=EXPERTS,
        top_k=TOP_K,
        tiled_tokens_per_s=round(rates["tiled"], 1),
        ragged_dot_tokens_per_s=round(rates["ragged_dot"], 1),
        ratio=round(rates["tiled"] / rates["ragged_dot"], 2),
        capacity_125_tokens_per_s=round(rates["capacity_1.25"], 1),
    )


def _all_to_all_bytes(hlo_text: str) -> int:
    total = 0
    for match in _ALL_TO_ALL.finditer(hlo_text):
        for dtype, dims in _ARRAY.findall(match.group(1)):
            total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def ep4(tokens: int, capacity_factor: float, dispatch_tokens: int = 0) -> dict:
    ep = 4
    mesh = make_mesh({"expert": ep}, jax.devices()[:ep])
    config = _config("tiled", capacity_factor, dispatch_tokens)
    grad = _loss_and_grad(config)

    def step(layer, x):
        with activation_sharding(mesh, DEFAULT_RULES):
            return grad(layer, x)

    from polaris_jax.models import sharding

    x = jnp.zeros((ep, tokens // ep, HIDDEN), jnp.float32)
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch",), mesh)))
    layer = _layer()
    compiled = jax.jit(step).lower(layer, x).compile()
    hlo = compiled.as_text()
    local = tokens // ep
    active = 3 * 2 * local * (TOP_K * 3 * HIDDEN * EXPERT_MLP + HIDDEN * EXPERTS)
    flops = matmul_flops(hlo)
    # A run-dispatched step's all-to-alls sit in a scan body, which the text count would see once.
    leaving = None if dispatch_tokens else _all_to_all_bytes(hlo) * (ep - 1) / ep / local
    analytic = 2 * 2 * TOP_K * HIDDEN * 4 * (ep - 1) / ep
    return dict(
        row="ep4",
        capacity_factor=capacity_factor,
        dispatch_tokens=dispatch_tokens,
        tokens_per_device=local,
        temp_mib=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 2),
        matmul_flops_per_device=flops,
        active_flops_per_device=active,
        flops_ratio=round(flops / active, 3),
        all_to_all_bytes_per_token=None if leaving is None else round(leaving, 1),
        analytic_bytes_per_token=round(analytic, 1),
        bytes_ratio=None if leaving is None else round(leaving / analytic, 3),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(cpu_grouped(args.tokens, args.repeats)), flush=True)
    for capacity_factor in (0.0, 1.0, 1.25):
        print(json.dumps(ep4(4 * args.tokens, capacity_factor)), flush=True)
    print(json.dumps(ep4(4 * args.tokens, 0.0, args.tokens // 4)), flush=True)  # dropless in 4 runs


if __name__ == "__main__":
    main()
