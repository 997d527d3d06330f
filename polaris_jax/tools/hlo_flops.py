"""Matmul FLOPs of a compiled XLA program, with loop bodies counted once per iteration.

`compiled.cost_analysis()["flops"]` visits a `while` body once, whatever its trip count, so a model
whose layers run under `lax.scan` is under-counted by about the number of layers. This reads the
optimised HLO text instead (`compiled.as_text()`), counts 2 * |output| * |contracted dims| for every
`dot`, and multiplies each while body by the `known_trip_count` XLA annotates it with. Only dots
are counted: elementwise work is small next to them at real sizes, and the figure is then directly
comparable with the 6·N·D convention. Remat recomputation is included, since it is in the program.
A loop without a known trip count (causal flash attention's inner loops, whose bounds depend on the
block) is counted once, so long-sequence attention FLOPs are under-counted there.
"""

from __future__ import annotations

import functools
import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"^(\w+)\[([\d,]*)\]\S*\s+(\w[\w\-]*)\((.*)$")
_PARAM = re.compile(r"([\w.\-]+):\s*\w+\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(calls|body|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _parse(hlo_text: str):
    """{computation: [(kind, payload)]}, entry name; kinds: 'dot' (flops) and 'call' (callee, times)."""
    comps: dict[str, list] = {}
    entry, current, shapes = None, None, {}
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current, shapes = header.group(1), {}
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            shapes.update({name: _dims(dims) for name, dims in _PARAM.findall(header.group(2))})
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        instr = _INSTR.match(line)
        if not instr:
            continue
        name, rest = instr.groups()
        array = _ARRAY.match(rest)  # tuple-shaped results (while, tuple) carry no dot of their own
        if array:
            _, dims, op, rest = array.groups()
            shapes[name] = _dims(dims)
        if array and op == "dot":
            lhs = rest.split(",", 1)[0].strip().lstrip("%").rstrip(")")
            contract = _CONTRACT.search(rest)
            lhs_shape = shapes.get(lhs)
            if lhs_shape is None or contract is None:
                raise ValueError(f"cannot read the operands of HLO dot {name!r}: {line.strip()[:200]}")
            k = math.prod(lhs_shape[i] for i in _dims(contract.group(1)))
            comps[current].append(("dot", 2 * math.prod(shapes[name]) * k))
        trip = _TRIP.search(rest)
        for kind, target in _CALLEES.findall(rest):
            times = int(trip.group(1)) if (kind == "body" and trip) else 1
            for callee in re.findall(r"%?([\w.\-]+)", target.strip("{}")):
                comps[current].append(("call", (callee, times)))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def matmul_flops(hlo_text: str) -> float:
    """Dot FLOPs of one execution of the program's ENTRY computation (per device for SPMD programs)."""
    comps, entry = _parse(hlo_text)

    @functools.cache
    def total(name: str) -> int:
        flops = 0
        for kind, payload in comps.get(name, ()):
            if kind == "dot":
                flops += payload
            else:
                callee, times = payload
                flops += times * total(callee)
        return flops

    return float(total(entry))
