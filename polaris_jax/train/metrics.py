"""Training metrics: clu averaging on device, TensorBoard (tensorboardX) + jsonl + console, FLOPs and MFU.

clu's own metric writers import TensorFlow; tensorboardX writes the same event files without it.

Model FLOPs per step (fwd + bwd, PaLM appendix B convention, remat recomputation not counted):
  6 * N_trainable * tokens + 4 * N_frozen * tokens        (frozen weights need no weight gradient)
  + 12 * layers * heads * head_dim * attended_pairs      (QK^T and PV: 2 matmuls * 2 FLOPs * 3 passes)
where N counts matmul weights a token passes through (lm_head included, the embedding gather not;
for MoE only the top-k experts), and attended_pairs is the number of causal (query, key) pairs
inside segments: sum over segments of L (L + 1) / 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip, matched as a lowercase substring of `device.device_kind` (first hit wins).
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989.4e12),
    ("h200", 989.4e12),
    ("gh200", 989.4e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("a10g", 70e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
)
LAST_VALUE_METRICS = ("learning_rate", "param_norm")


def peak_flops_per_device(device_kind: str | None = None, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device, from the table (None if unknown, e.g. CPU) unless `override` > 0."""
    if override > 0:
        return float(override)
    kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    return None


def matmul_params_per_token(model_config, lora: bool = False) -> tuple[int, int]:
    """(trainable, frozen) matmul weights one token passes through; LoRA splits base vs adapters."""
    c = model_config
    d, n, kv, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    attn = d * n * h * 2 + d * kv * h * 2
    rank = c.lora_rank
    targets = set(c.lora_targets) if rank else set()
    adapters_attn = sum(rank * (d + (n if t in "qo" else kv) * h) for t in ("q", "k", "v", "o") if t in targets)
    dense_mlp = 3 * d * c.intermediate_size
    adapters_dense = sum(rank * (d + c.intermediate_size) for t in ("gate", "up", "down") if t in targets)
    base, adapters = c.vocab_size * d, 0  # lm_head (tied or not, it is a matmul)
    for kind, _, count in c.layer_runs():
        base += count * attn
        adapters += count * adapters_attn
        if kind == "moe":
            k, f = c.num_experts_per_tok, c.moe_intermediate_size
            base += count * (3 * d * f * k + d * c.num_experts)
            adapters += count * k * sum(rank * (d + f) for t in ("gate", "up", "down") if t in targets)
        else:
            base += count * dense_mlp
            adapters += count * adapters_dense
    return (adapters, base) if lora else (base + adapters, 0)


def attended_pairs(segment_ids_bt: np.ndarray) -> int:
    """Causal (query, key) pairs within non-zero segments, summed over the batch."""
    total = 0
    for row in np.asarray(segment_ids_bt):
        _, counts = np.unique(row[row != 0], return_counts=True)
        total += int(np.sum(counts * (counts + 1) // 2))
    return total


def step_flops(model_config, num_tokens: int, pairs: int, lora: bool = False) -> float:
    trainable, frozen = matmul_params_per_token(model_config, lora)
    attention = 12 * model_config.num_layers * model_config.num_heads * model_config.head_dim * pairs
    return float(6 * trainable * num_tokens + 4 * frozen * num_tokens + attention)


def make_collection(names):
    """A clu Collection type averaging each named scalar over a logging interval (last value for a few)."""
    from clu import metrics as clu_metrics  # here, so FLOP counting imports on a bare JAX install

    fields = {
        name: (clu_metrics.LastValue if name in LAST_VALUE_METRICS else clu_metrics.Average).from_output(name)
        for name in names
    }
    return clu_metrics.Collection.create(**fields)


class Accumulator:
    """Merges per-step device metrics in one jitted clu update (no host sync); `compute()` fetches averages."""

    def __init__(self):
        self._value, self._first, self._merge, self._compute = None, None, None, None

    def _build(self, names) -> None:
        collection = make_collection(sorted(names))
        self._first = jax.jit(lambda m: collection.single_from_model_output(**m))
        self._merge = jax.jit(lambda acc, m: acc.merge(collection.single_from_model_output(**m)))
        self._compute = jax.jit(lambda acc: acc.compute())

    def add(self, step_metrics: dict) -> None:
        if self._first is None:
            self._build(step_metrics)
        self._value = self._first(step_metrics) if self._value is None else self._merge(self._value, step_metrics)

    def compute(self) -> dict[str, float]:
        if self._value is None:
            return {}
        out = {k: float(v) for k, v in jax.device_get(self._compute(self._value)).items()}
        self._value = None
        return out


class _DropLibraryInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(p in record.pathname for p in _CHATTY_LIBRARIES)


_CHATTY_LIBRARIES = ("/orbax/", "/grain/")
_LIBRARY_FILTER = _DropLibraryInfo()


def quiet_library_logs() -> None:
    """Drops orbax's and grain's INFO lines (several per checkpoint) from the absl log; warnings stay."""
    absl_logger = logging.getLogger("absl")
    if _LIBRARY_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_LIBRARY_FILTER)


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """`step 40/100 [########------------] 40% eta 0:01:12`; the rate excludes the first (compiling) step."""

    def __init__(self, total_steps: int, width: int = 20):
        self.total, self.width = total_steps, width
        self._anchor = None  # (step, time) after the first update

    def render(self, step: int, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if self._anchor is None:
            self._anchor = (step, now)
        done_steps, elapsed = step - self._anchor[0], now - self._anchor[1]
        eta = (self.total - step) * elapsed / done_steps if done_steps > 0 else float("nan")
        frac = min(max(step / max(self.total, 1), 0.0), 1.0)
        filled = int(round(frac * self.width))
        return (
            f"step {step}/{self.total} [{'#' * filled}{'-' * (self.width - filled)}] {100 * frac:3.0f}% "
            f"eta {_format_seconds(eta)}"
        )


class MetricWriter:
    """Writes scalars to TensorBoard event files, `metrics.jsonl` and the console (with a progress bar)."""

    def __init__(self, logdir: str, *, total_steps: int, tensorboard: bool = True, console: bool = True, stream=None):
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self._tb = None
        if tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=logdir, flush_secs=30)
        self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a") if jax.process_index() == 0 else None
        self._console = console and jax.process_index() == 0
        self._stream = stream or sys.stdout
        self.progress = ProgressBar(total_steps)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")
            self._jsonl.flush()
        if self._console:
            shown = " ".join(f"{k}={_short(v)}" for k, v in scalars.items() if "/" not in k)
            print(f"{self.progress.render(step)} {shown}", file=self._stream, flush=True)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _short(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"
