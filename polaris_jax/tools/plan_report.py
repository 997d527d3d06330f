"""What a plan says, for people: whether its peaks fit a device, and its rows as the `plan` CLI prints them.

`memory_plan` computes the figures (compiled or analytic); this reads a finished result only.
"""

from __future__ import annotations

import math

GIB = 1024**3

# Device memory as the vendors publish it (GB = 1e9 bytes): H100 / H800 SXM 80 GB, H200 141 GB HBM3e,
# TPU v5p 95 GB and v6e (Trillium) 32 GB of HBM per chip.
HARDWARE_BYTES = {"h100": 80e9, "h200": 141e9, "h800": 80e9, "v5p": 95e9, "v6e": 32e9}


def fit(result: dict, hardware: str) -> dict:
    """Whether each planned peak fits one `hardware` device; where one does not, the term that overflows
    (the largest part of that peak). Adds hardware, device_memory_bytes, train_fits, train_overflow,
    and rollout_fits / rollout_overflow when a rollout was planned."""
    if hardware not in HARDWARE_BYTES:
        raise ValueError(f"hardware={hardware!r} is not one of {sorted(HARDWARE_BYTES)}")
    memory = int(HARDWARE_BYTES[hardware])
    terms = {
        "train": {
            "params": result["params_bytes"],
            "optimizer_state": result["optimizer_state_bytes"],
            "activations": result["activations_bytes"],
        },
        "rollout": {
            "params": result["params_bytes"],
            "optimizer_state": result.get("rollout_optimizer_state_bytes", result["optimizer_state_bytes"]),
            "kv_cache": result.get("kv_cache_bytes", 0),
            "rollout_temp": result.get("rollout_temp_bytes", 0) - result.get("kv_cache_bytes", 0),
        },
    }
    out = {"hardware": hardware, "device_memory_bytes": memory}
    for phase in ("train", "rollout"):
        peak = result.get(f"{phase}_peak_bytes")
        if peak is None:
            continue
        fits = peak <= memory
        out[f"{phase}_fits"] = fits
        out[f"{phase}_overflow"] = None if fits else max(terms[phase], key=terms[phase].get)
    return out


def analytic_rows(result: dict) -> list[tuple[str, str]]:
    """(label, value) rows for printing a `plan_analytic` result."""
    rows = [
        ("mesh", ",".join(f"{k}={v}" for k, v in result["mesh"].items())),
        ("batch x seq_len", f"{result['batch_size']} x {result['seq_len']}"),
    ]
    rows += [
        (f"{key.removesuffix('_bytes').replace('_', ' ')} / device", format_bytes(value))
        for key, value in result.items()
        if key.endswith("_bytes") and not key.startswith(("activations", "train_peak", "device_memory"))
    ]
    if "hardware" in result:
        verdict = "fits" if result["train_fits"] else f"does not fit: {result['train_overflow']} is the largest term"
        rows.append((f"train peak on {result['hardware']} ({format_bytes(result['device_memory_bytes'])})", verdict))
    return rows


def format_bytes(num: float | None) -> str:
    if num is None:
        return "-"
    if num >= GIB / 10:
        return f"{num / GIB:.2f} GiB"
    return f"{num / 2**20:.1f} MiB" if num >= 2**20 / 10 else f"{num / 1024:.1f} KiB"


def format_flops(num: float | None) -> str:
    if num is None or num <= 0 or not math.isfinite(num):
        return "-"
    exp = int(math.floor(math.log10(num) / 3) * 3)
    prefix = {0: "", 3: "K", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E", 21: "Z"}.get(exp, f"e{exp}")
    return f"{num / 10**exp:.2f} {prefix}FLOP"


def _passes(result: dict) -> str:
    """How the step splits its batch: microbatches, or packed rows in micro passes of a token budget."""
    if not result.get("pack_tokens"):
        return f"{result['microbatches']} microbatches"
    micro = result.get("micro_tokens")
    budget = (
        f", micro passes of {micro} tokens per batch shard" if micro else f", {result['microbatches']} microbatches"
    )
    return f"packed into rows of {result['pack_tokens']} tokens{budget}"


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """(label, value) rows for printing one plan."""
    rows = [
        ("mesh", ",".join(f"{k}={v}" for k, v in result["mesh"].items())),
        ("batch x seq_len", f"{result['batch_size']} x {result['seq_len']} ({_passes(result)})"),
        ("lora rank", str(result["lora_rank"]) if result["lora_rank"] else "full fine-tuning"),
        ("params / device", format_bytes(result["params_bytes"])),
        ("  of which trainable", format_bytes(result["trainable_params_bytes"])),
        ("optimizer state / device", format_bytes(result["optimizer_state_bytes"])),
        ("activations (XLA temp) / device", format_bytes(result["activations_bytes"])),
        ("  offloaded to host / device", format_bytes(result["host_activations_bytes"])),
        ("train step peak / device", format_bytes(result["train_peak_bytes"])),
        ("  analytic estimate (no compile) / device", format_bytes(result.get("analytic_train_peak_bytes"))),
    ]
    if "kv_cache_bytes" in result:
        rows += [
            (
                f"kv page pool ({result['engine_pages']} pages x {result['engine_page_size']}) / device"
                if "engine_pages" in result
                else f"kv cache ({result['rollout_batch']} rows x {result['rollout_len']}) / device",
                format_bytes(result["kv_cache_bytes"]),
            ),
            ("rollout state + temp (cache incl.) / device", format_bytes(result["rollout_temp_bytes"])),
            (
                "rollout peak (+ params, optimizer) / device"
                if result["rollout_optimizer_state_bytes"]
                else "rollout peak (+ params; optimizer on host) / device",
                format_bytes(result["rollout_peak_bytes"]),
            ),
        ]
    if "hardware" in result:
        memory = format_bytes(result["device_memory_bytes"])
        for phase in ("train", "rollout"):
            if f"{phase}_fits" in result:
                overflow = result[f"{phase}_overflow"]
                verdict = "fits" if result[f"{phase}_fits"] else f"does not fit: {overflow} is the largest term"
                rows.append((f"{phase} peak on {result['hardware']} ({memory})", verdict))
    rows += [
        ("compiled matmul flops / device / step", format_flops(result["matmul_flops_per_device"])),
        ("  x devices", format_flops(result["matmul_flops_per_device"] * result["devices"])),
        ("model flops / step (6ND + attention)", format_flops(result["model_flops_per_step"])),
        ("XLA cost_analysis flops / device (loop bodies once)", format_flops(result["xla_flops_per_device"])),
        ("compile time", f"{result['compile_s']} s"),
    ]
    return rows
