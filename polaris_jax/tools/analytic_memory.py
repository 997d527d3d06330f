"""A closed-form estimate of a train step's per-device memory, beside the compiler's figures.

`memory_plan` compiles the step and reads XLA's memory analysis; this counts the buffers instead, from the
model's sizes, the batch and the mesh, in microseconds. The planner prints both (`analytic_*` keys), and
`tests/tools/test_analytic_memory.py` checks each analytic figure against the compiled step on fake
devices at scaled-down shapes (within 10%).

  params, trainable params,   the shards of the abstract train state (exact: shapes x shardings)
  optimizer state, batch
  gradients                   the trainable params' shards, once more
  saved residuals             what the remat policy keeps across the layer scan: each layer's input
                              [rows, tokens, D] in the compute dtype (full), nothing on the device (offload)
  loss phase                  one loss chunk's backward: the gathered unembedding, its unsharded float32
                              gradient (and a compute-dtype copy under bf16, and an accumulator when
                              gradients accumulate over micro passes), `LOGITS_BUFFERS` float32 logits-sized
                              buffers of the chunk ([rows x chunk, V]), `HIDDEN_BUFFERS` [rows x tokens, D]
  layer phase                 one layer's backward under full remat: its gathered weights and their unsharded
                              gradient, and per token `MLP_BUFFERS` x F + `EMBED_BUFFERS` x D + `QUERY_BUFFERS`
                              x heads x head_dim + `KV_BUFFERS` x kv_heads x head_dim float32 values: the
                              recomputed forward and its cotangents
  activations                 saved residuals + the larger phase
  train peak                  params + optimizer state + batch + gradients + activations

The buffer counts are what XLA keeps live at those two peaks on CPU (read from its buffer assignment and
from how the compiled temporaries grow with each size; XLA:CPU holds most bf16 work in float32, so bf16
compute keeps `BF16_LAYER_SHARE` of the float32 layer working set). A GPU or TPU compiler fuses more and
holds less. Only dense models under full or offloaded remat are estimated: the other policies save most of
each layer and MoE layers hold routing buffers, so there the estimate is None and the compiled figures stand.
"""

from __future__ import annotations

import math

from jax.sharding import Mesh

from polaris_jax.models import context_parallel
from polaris_jax.models.sharding import DEFAULT_RULES, logical_to_spec, shard_count
from polaris_jax.sampling.sampler import batch_shards
from polaris_jax.train.grpo.packing import packed_rows

LOGITS_BUFFERS = 2.3  # logits, their cotangent, the softmax (in part: some share a buffer with the next chunk)
HIDDEN_BUFFERS = 2.0  # the final hidden states and their cotangent
MLP_BUFFERS = 8.0  # gate, up, silu(gate), their product, and the cotangent of each
EMBED_BUFFERS = 9.0  # the layer input, norms, attention output, residual sums and their cotangents
QUERY_BUFFERS = 5.3  # q before and after its norm and rotation, the attention output, cotangents
KV_BUFFERS = 6.3  # k and v (k normed and rotated), their cotangents
BF16_LAYER_SHARE = 0.7
SAVED_BYTES = 4  # XLA:CPU holds the stacked layer inputs in float32 under bf16 compute too (a GPU: 2 bytes)
ESTIMATED_REMAT = ("full", "offload")


def _shards(mesh: Mesh, rules, axis: str) -> int:
    return shard_count(mesh, logical_to_spec((axis,), mesh, rules))


def micro_pass(request, mesh: Mesh, rules=DEFAULT_RULES) -> tuple[int, int, int, int]:
    """(rows, positions per row, loss-chunk positions per row, passes): what one device runs in one micro
    pass, and the passes of an optimiser step (of one minibatch, for GRPO)."""
    update, seq, shards = request.update, _shards(mesh, rules, "length"), batch_shards(mesh, rules)
    if update is None:
        passes, length, chunk = request.microbatches, request.seq_len, request.loss_chunk
        rows = math.ceil(request.batch_size / passes / shards)
    elif update.pack_tokens:
        # The planner's packed batch: every sequence at full length (memory_plan.abstract_update_batch).
        per_row = max(1, update.pack_tokens // request.seq_len)
        needed = -(-(request.batch_size // update.minibatches) // per_row)
        k = packed_rows(needed, update.packed_row_multiple * shards)
        passes = k // (update.micro_rows * shards) if update.micro_rows else update.microbatches
        rows, length, chunk = k // passes // shards, update.pack_tokens, update.chunk_size
    else:
        passes, length, chunk = update.microbatches, request.seq_len, update.chunk_size
        rows = math.ceil(request.batch_size / update.minibatches / passes / shards)
    positions = length // seq
    return max(rows, 1), positions, min(chunk, positions), passes


def out_of_scope(model_config) -> str | None:
    """Why the estimate does not cover this model, or None."""
    if model_config.is_moe or model_config.remat_policy not in ESTIMATED_REMAT:
        kind = "an MoE model" if model_config.is_moe else f"remat_policy={model_config.remat_policy!r}"
        return f"the analytic estimate covers dense models under remat {ESTIMATED_REMAT}, not {kind}; plan it compiled"
    return None


def estimate(request, mesh: Mesh, exact: dict, rules=DEFAULT_RULES) -> dict | None:
    """Per-device bytes: {gradients, saved_residuals, loss_phase, layer_phase, activations, temporaries,
    train_peak}.

    `exact` holds the state's own shard sizes (`params`, `trainable_params`, `optimizer_state`, `batch`:
    `memory_plan.plan_train_step`'s). None where the model or remat policy is outside the estimate."""
    cfg = request.model_config
    if out_of_scope(cfg):
        return None
    tp, seq = _shards(mesh, rules, "vocab"), _shards(mesh, rules, "length")
    if seq > 1:  # what the step's trace would refuse (a ConfigError, a ValueError), refused here too
        update = request.update
        row = update.pack_tokens if update is not None and update.pack_tokens else request.seq_len
        context_parallel.check(cfg, row, seq, cfg.num_heads // tp, cfg.num_kv_heads // tp)
    rows, positions, chunk, passes = micro_pass(request, mesh, rules)
    tokens = rows * positions
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    half_compute = cfg.compute_dtype in ("bfloat16", "float16")
    frozen_base = bool(cfg.lora_rank)
    # A weight gathered for the phase, its unsharded float32 gradient (trained), a compute-dtype copy (bf16).
    weight_copies = 1 + (0 if frozen_base else 1) + (0.5 if half_compute else 0)

    unembed = v * d * 4 / tp
    loss_phase = weight_copies * unembed + LOGITS_BUFFERS * rows * chunk * v / tp * 4 + HIDDEN_BUFFERS * tokens * d * 4

    layer_weights = (d * (q + 2 * kv) + q * d + 3 * d * f) * 4 / tp
    per_token = MLP_BUFFERS * f / tp + EMBED_BUFFERS * d + (QUERY_BUFFERS * q + KV_BUFFERS * kv) / tp
    share = BF16_LAYER_SHARE if half_compute else 1.0
    layer_phase = weight_copies * layer_weights + share * tokens * per_token * 4

    saved = 0 if cfg.remat_policy == "offload" else cfg.num_layers * tokens * d * SAVED_BYTES
    gradients = exact["trainable_params"]
    # Over micro passes XLA accumulates the unembedding's gradient unsharded (its reduce-scatter sunk out of
    # the loop), live through both phases.
    accumulator = unembed if passes > 1 and not frozen_base else 0
    activations = saved + accumulator + max(loss_phase, layer_phase)
    peak = exact["params"] + exact["optimizer_state"] + exact["batch"] + gradients + activations
    return {
        "gradients": int(gradients),
        "saved_residuals": int(saved),
        "loss_phase": int(loss_phase),
        "layer_phase": int(layer_phase),
        "activations": int(activations),
        "temporaries": int(gradients + activations),  # what XLA's temp holds: gradients beside activations
        "train_peak": int(peak),
    }
