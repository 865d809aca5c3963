"""One launch's estimate from its machine code (see model.py for the model and
sass.py for how loops are found and named).

Trip counts come from the launch: each launcher gives, per loop variable of the
kernel's source (``Launch.loops`` for Triton, ``cuda.py`` for the CUDA
kernels), how many times that loop runs each time it is entered (the mean over
programs where programs differ, e.g. a last chunk that is shorter). A machine
loop takes the trip count of the source loop it comes from; nested loops
multiply. Loops with a constant trip count that the compiler unrolled are no
machine loops and need none. A machine loop without a trip count is counted
once and reported as a warning: the estimate is then incomplete.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Any

from vitkernels.estimate import model, sass


@dataclasses.dataclass
class Code:
    """A compiled kernel: one function of a cubin, disassembled."""

    backend: str  # "triton" or "cuda"
    function: sass.Function
    registers: int
    static_shared: int
    spill_stores: int
    spill_loads: int

    @functools.cached_property
    def source_loops(self) -> list[sass.SourceLoop]:
        files = {i.file for i in self.function.insns if i.file and os.path.exists(i.file)}
        out: list[sass.SourceLoop] = []
        for path in sorted(files):
            out += _loops_of(path)
        return out


@functools.cache
def _loops_of(path: str) -> list[sass.SourceLoop]:
    return sass.python_loops(path) if path.endswith(".py") else sass.c_loops(path)


def _where(lp: sass.Loop) -> str:
    if lp.source is None:
        lines = sorted({(i.file, i.line) for i in lp.insns if i.line})
        return f"0x{lp.start:x}-0x{lp.end:x}" + (f" ({os.path.basename(lines[0][0])}:{lines[0][1]})" if lines else "")
    return f"{os.path.basename(lp.source.file)}:{lp.source.first}"


def analyse(
    code: Code,
    *,
    programs: int,
    warps: int,
    dynamic_shared: int,
    trips: dict[str, float],
    bytes_read: int,
    bytes_written: int,
) -> dict[str, Any]:
    """The per-launch numbers (a JSON-ready dict) for one launch of ``code``."""
    f = code.function
    insns = sass.reachable(f)
    machine, owner = sass.loops(f, insns)
    sass.attribute(machine, code.source_loops)
    warnings: list[str] = []
    loop_trips: dict[int, float] = {}
    seen_sources: dict[sass.SourceLoop, int] = {}
    for lp in machine:
        var = lp.source.var if lp.source else None
        if var is None or var not in trips:
            what = f"loop variable {var!r}" if var else "no source loop"
            warnings.append(f"machine loop at {_where(lp)} ({what}) has no trip count: counted once")
            loop_trips[id(lp)] = 1.0
        else:
            loop_trips[id(lp)] = float(trips[var])
        if lp.source is not None:
            seen_sources[lp.source] = seen_sources.get(lp.source, 0) + 1
    for src, n in seen_sources.items():
        if n > 1:
            warnings.append(f"source loop {os.path.basename(src.file)}:{src.first} ({src.var}) "
                            f"became {n} machine loops, each counted with its trip count")  # fmt: skip

    def mult(lp: sass.Loop | None) -> float:
        m = 1.0
        while lp is not None:
            m *= loop_trips[id(lp)]
            lp = lp.parent
        return m

    executed = 0.0
    flops: dict[tuple[str, str], float] = collections.defaultdict(float)
    mma_static: collections.Counter[str] = collections.Counter()
    mma_executed = 0.0
    for insn in insns:
        m = mult(owner[insn.addr])
        executed += m
        mf = sass.mma_flops(insn, warps)
        if mf is not None:
            kind, ty, fl = mf
            flops[(kind, ty)] += m * fl
            mma_static[insn.full] += 1
            mma_executed += m
    outside = [i for i in insns if owner[i.addr] is None]
    loops_out = []
    for lp in machine:
        cats = collections.Counter(sass.category(i) for i in lp.insns)
        ops = collections.Counter(i.op for i in lp.insns)
        loops_out.append({
            "source": _where(lp),
            "var": lp.source.var if lp.source else None,
            "depth": lp.depth,
            "trips": loop_trips[id(lp)],
            "executions_per_program": mult(lp),
            "insns_per_iteration": len(lp.insns),
            "breakdown": dict(cats.most_common()),
            "top_ops": dict(ops.most_common(10)),
            "attribution": round(lp.votes, 3),
        })  # fmt: skip

    shared = code.static_shared + dynamic_shared
    occ = model.occupancy(code.registers, shared, warps)
    warp_insns = executed * warps
    nbytes = bytes_read + bytes_written
    times = {
        "mem": model.t_mem(nbytes),
        "mma": model.t_mma(dict(flops), programs),
        "issue": model.t_issue(warp_insns, programs),
    }
    bound = max(times, key=lambda k: times[k])
    kinds = sorted({k for k, _ in flops})
    return {
        "backend": code.backend,
        "kernel": f.name,
        "programs": programs,
        "warps": warps,
        "registers": code.registers,
        "spill_bytes": code.spill_stores + code.spill_loads,
        "shared_bytes": shared,
        "occupancy": {"programs_per_sm": occ.blocks_per_sm, "limited_by": occ.limited_by,
                      "warps_fraction": round(occ.fraction, 3)},
        "waves": programs / (occ.blocks_per_sm * model.SMS),
        "tensor_core": {
            "kind": "+".join(kinds) if kinds else "none",
            "instructions": dict(mma_static),
            "executed_per_program": mma_executed,
            "flops_per_program": sum(flops.values()),
        },
        "sass": {
            "reachable_instructions": len(insns),
            "executed_per_program_per_warp": executed,
            "warp_instructions": warp_insns * programs,
            "outside_loops": len(outside),
            "outside_loops_breakdown": dict(collections.Counter(sass.category(i) for i in outside).most_common()),
            "loops": loops_out,
        },
        "bytes_read": bytes_read,
        "bytes_written": bytes_written,
        "t_mem_us": times["mem"] * 1e6,
        "t_mma_us": times["mma"] * 1e6,
        "t_issue_us": times["issue"] * 1e6,
        "launch_us": model.LAUNCH_S * 1e6,
        "estimate_us": (times[bound] + model.LAUNCH_S) * 1e6,
        "bound": bound,
        "warnings": warnings,
    }


def torch_op(name: str, bytes_read: int, bytes_written: int) -> dict[str, Any]:
    """A torch operation between kernels: its bytes and a launch."""
    t = model.t_mem(bytes_read + bytes_written)
    return {
        "backend": "torch",
        "kernel": name,
        "bytes_read": bytes_read,
        "bytes_written": bytes_written,
        "t_mem_us": t * 1e6,
        "t_mma_us": 0.0,
        "t_issue_us": 0.0,
        "launch_us": model.LAUNCH_S * 1e6,
        "estimate_us": (t + model.LAUNCH_S) * 1e6,
        "bound": "mem",
        "warnings": [],
    }
