"""`GET /metrics`: Prometheus text exposition of the engines, the trainer queue and training latencies.

Gauges: the engine's waiting queue, live slots and KV pages (base engine); the trainer's queued
requests; counters: prefill and decode tokens, preemptions (every engine), forward(_backward) calls that
ran several clients' requests together and those requests (multi-LoRA training), and summaries (count, sum
in seconds) of forward_backward and optim_step. Decode tokens/s is `rate(polaris_decode_tokens_total)`.
"""

from __future__ import annotations

import collections


def _line(name: str, value, labels: str = "") -> str:
    return f"{name}{labels} {float(value):.6g}"


def render(base_engine, adapter_engines, training=None) -> str:
    engine = base_engine.engine
    last = engine.last_metrics
    lines = [
        "# TYPE polaris_engine_queue_length gauge",
        _line("polaris_engine_queue_length", engine.queue_length),
        "# TYPE polaris_engine_live_slots gauge",
        _line("polaris_engine_live_slots", last.get("live_slots", 0)),
        "# TYPE polaris_engine_max_slots gauge",
        _line("polaris_engine_max_slots", engine.settings.max_slots),
        "# TYPE polaris_engine_pages_used gauge",
        _line("polaris_engine_pages_used", engine.pool.num_used),
        "# TYPE polaris_engine_pages_total gauge",
        _line("polaris_engine_pages_total", engine.settings.num_pages),
        "# TYPE polaris_adapter_engines gauge",
        _line("polaris_adapter_engines", len(adapter_engines)),
    ]
    totals = collections.Counter()
    for thread in [base_engine, *adapter_engines]:
        totals.update(thread.engine.totals)
    for key in ("prefill_tokens", "decode_tokens", "preemptions"):
        lines += [f"# TYPE polaris_{key}_total counter", _line(f"polaris_{key}_total", totals[key])]
    if training is not None:
        lines += [
            "# TYPE polaris_trainer_queue_length gauge",
            _line("polaris_trainer_queue_length", training.worker.depth()),
            "# TYPE polaris_forward_backward_batched_calls_total counter",
            _line("polaris_forward_backward_batched_calls_total", training.batched[0]),
            "# TYPE polaris_forward_backward_batched_requests_total counter",
            _line("polaris_forward_backward_batched_requests_total", training.batched[1]),
        ]
        for kind, (count, seconds) in training.latency_s.items():
            lines += [
                f"# TYPE polaris_{kind}_seconds summary",
                _line(f"polaris_{kind}_seconds_count", count),
                _line(f"polaris_{kind}_seconds_sum", seconds),
            ]
    return "\n".join(lines) + "\n"
