"""The planner's mesh search (`python -m polaris_jax.tools.plan --mesh=auto --devices=N`): every way to lay N
devices out as fsdp x expert x sequence that the model allows is planned (the train step only, compiled as
it runs), and the mesh with the smallest train-step peak per device is kept; the whole plan (rollout
included) then runs on it.

Candidates: `expert` divides the MoE's expert count (dense models: 1); `sequence` splits the row (the
context-parallel scheme's own checks refuse what it cannot split: a Ulysses head count, a ring row length);
`fsdp` takes the rest. A candidate the step refuses is kept in the table with its error. Ties (within 1%)
go to the mesh with fewer sequence then expert shards: less collective traffic per token.

    best, table = search(plan_train_peak, candidate_meshes(8, model_config))
"""

from __future__ import annotations

from collections.abc import Callable

TIE = 0.01


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(devices: int, model_config) -> list[dict[str, int]]:
    """{fsdp, expert, sequence} shapes of `devices` devices (size-1 axes other than fsdp left out)."""
    experts = model_config.num_experts if model_config.is_moe else 1
    out = []
    for expert in divisors(devices):
        if experts % expert:
            continue
        for sequence in divisors(devices // expert):
            shape = {"fsdp": devices // expert // sequence, "expert": expert, "sequence": sequence}
            out.append({axis: size for axis, size in shape.items() if size > 1 or axis == "fsdp"})
    return out


def search(train_peak_of: Callable[[dict], int], candidates: list[dict]) -> tuple[dict, list[dict]]:
    """(the chosen mesh, one row per candidate: {mesh, train_peak_bytes} or {mesh, error})."""
    table = []
    for mesh in candidates:
        try:
            table.append({"mesh": mesh, "train_peak_bytes": int(train_peak_of(mesh))})
        except ValueError as e:  # ConfigError included: a split the model or step refuses
            table.append({"mesh": mesh, "error": str(e).splitlines()[0][:300]})
    planned = [row for row in table if "train_peak_bytes" in row]
    if not planned:
        raise ValueError(f"no mesh of {candidates} plans: {[row['error'] for row in table]}")
    least = min(row["train_peak_bytes"] for row in planned)
    near = [row for row in planned if row["train_peak_bytes"] <= least * (1 + TIE)]
    best = min(near, key=lambda row: (row["mesh"].get("sequence", 1), row["mesh"].get("expert", 1)))
    return best["mesh"], table
