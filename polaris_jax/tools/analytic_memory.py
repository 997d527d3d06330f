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
  MoE layer phase             an MoE layer's backward (models/moe.py): its attention as above, the experts it
                              holds (E / EP, gathered along embed) like a layer's weights, and per dispatched
                              row (R = EP x n x k: every pair one device could send each EP peer, dropless;
                              n is `moe_dispatch_tokens` where that is smaller, but not in the pairs' count)
                              `MOE_ROW_BUFFERS` x D, per tile-padded row (the tiled grouped matmul)
                              `MOE_TILE_BUFFERS` x F, per routed pair `MOE_PAIR_BUFFERS` x D float32 values
  activations                 saved residuals + the largest phase (+ gradient accumulators over micro
                              passes: the unembedding's, unsharded, and under MoE the experts' shards)
  train peak                  params + optimizer state + batch + gradients + activations

The buffer counts are what XLA keeps live at those two peaks on CPU (read from its buffer assignment and
from how the compiled temporaries grow with each size; XLA:CPU holds most bf16 work in float32, so bf16
compute keeps `BF16_LAYER_SHARE` of the float32 layer working set). A GPU or TPU compiler fuses more and
holds less. The MoE counts are fitted to the compiled steps of Qwen3-30B-A3B-shaped layers. Outside the
estimate (None; the compiled figures stand): remat policies other than full and offload (they save most of
each layer), a capacity factor (that path frees part of its gathered experts before its peak and its buffers
fit no count within 10%), and MoE models with dense layers mixed in (the compiled step holds more than
either kind's phase).
"""

from __future__ import annotations

import math

from jax.sharding import Mesh

from polaris_jax.models import context_parallel, moe
from polaris_jax.models.grouped_matmul import tile_size
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
# Dropless MoE: the send, receive, sorted, tiled and returned rows and their cotangents; the grouped matmuls'
# gate / up / product outputs; the pairs gathered before dispatch and combined after.
MOE_ROW_BUFFERS = 10.2
MOE_TILE_BUFFERS = 4.1
MOE_PAIR_BUFFERS = 4.0
BF16_MOE_SHARE = 0.85


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
    cfg = model_config
    if cfg.remat_policy not in ESTIMATED_REMAT:
        kind = f"remat {ESTIMATED_REMAT}, not remat_policy={cfg.remat_policy!r}"
    elif cfg.is_moe and cfg.moe_capacity_factor > 0:
        kind = f"dropless MoE dispatch, not moe_capacity_factor={cfg.moe_capacity_factor}"
    elif cfg.is_moe and cfg.num_layers_of("dense"):
        kind = f"MoE models whose layers are all MoE, not {cfg.num_layers_of('dense')} dense layers mixed in"
    else:
        return None
    return f"the analytic estimate covers {kind}; plan it compiled"


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

    attention_weights = (d * (q + 2 * kv) + q * d) * 4 / tp
    attention_per_token = EMBED_BUFFERS * d + (QUERY_BUFFERS * q + KV_BUFFERS * kv) / tp
    share = BF16_LAYER_SHARE if half_compute else 1.0
    if cfg.is_moe:  # every layer MoE (out_of_scope)
        layer_phase, expert_shard = _moe_layer(
            cfg, mesh, rules, tokens, weight_copies, attention_weights, attention_per_token
        )
        expert_gradients = 0 if frozen_base else cfg.num_layers * expert_shard
    else:
        dense_weights = attention_weights + 3 * d * f * 4 / tp
        per_token = attention_per_token + MLP_BUFFERS * f / tp
        layer_phase = weight_copies * dense_weights + share * tokens * per_token * 4
        expert_gradients = 0

    saved = 0 if cfg.remat_policy == "offload" else cfg.num_layers * tokens * d * SAVED_BYTES
    gradients = exact["trainable_params"]
    # Over micro passes XLA accumulates the unembedding's gradient unsharded (its reduce-scatter sunk out of
    # the loop) and the experts' gradients (they leave the experts' shard_map per pass), live through both phases.
    accumulator = unembed + expert_gradients if passes > 1 and not frozen_base else 0
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


def _moe_layer(cfg, mesh, rules, tokens, weight_copies, attention_weights, attention_per_token) -> tuple[float, float]:
    """(bytes of one MoE layer's backward phase, bytes of one layer's expert weight shards on a device)."""
    ep_axes, ep = moe.expert_axes(mesh, rules, cfg.num_experts)
    tp, embed_shards = _shards(mesh, rules, "mlp"), _shards(mesh, rules, "embed")
    token_spec = logical_to_spec(("batch", "length"), mesh, rules)
    n = -(-tokens // ep) if moe.dispatches_a_share(ep_axes, ep, token_spec) else tokens
    # Dispatched in runs, the rematerialised step holds one run's send/receive and tile buffers.
    run = cfg.moe_dispatch_tokens if 0 < cfg.moe_dispatch_tokens < n else n
    e, k, d, f = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    local = e // ep
    rows = run * k * ep
    tile = tile_size(rows, local)
    padded = (-(-rows // tile) + local) * tile
    expert_weights = 3 * local * d * f * 4 / tp
    values = (
        tokens * attention_per_token
        + MOE_ROW_BUFFERS * rows * d
        + MOE_TILE_BUFFERS * padded * f / tp
        + MOE_PAIR_BUFFERS * n * k * d
    )
    share = BF16_MOE_SHARE if cfg.compute_dtype in ("bfloat16", "float16") else 1.0
    phase = weight_copies * (attention_weights + expert_weights) + share * values * 4
    return phase, expert_weights / embed_shards
