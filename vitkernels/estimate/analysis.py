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
    weight = sass.branch_weights(f, insns)
    warnings: list[str] = []
    notes: list[str] = []
    loop_trips: dict[int, float] = {}
    unrolled: dict[int, int] = {}
    for lp in machine:
        if len(lp.insns) <= 16 and any(i.op.startswith("ATOM") and "CAS" in i.mods for i in lp.insns):
            notes.append(f"compare-and-swap retry loop at {_where(lp)} counted once (no contention)")
            lp.source = None
            loop_trips[id(lp)] = 1.0
            continue
        n = _trip_count(lp, trips)
        if n is None:
            what = f"loop variable {lp.source.var!r}" if lp.source else "no source loop"
            warnings.append(f"machine loop at {_where(lp)} ({what}) has no trip count: counted once")
            n = 1.0
        loop_trips[id(lp)] = n
    _split_unrolled(machine, weight, loop_trips, unrolled, notes)

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
    by_class: collections.Counter[str] = collections.Counter()  # executed, per instruction class
    for insn in insns:
        m = mult(owner[insn.addr]) * weight[insn.addr]
        executed += m
        by_class[sass.category(insn)] += m
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
            "unrolled_copies": unrolled.get(id(lp), 1),
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
            "executed_by_class": {k: v for k, v in by_class.most_common() if v},
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
        "notes": notes,
    }


def _trip_count(lp: sass.Loop, trips: dict[str, float]) -> float | None:
    """The trip count given for the loop's source loop: a header key first, then its variable."""
    if lp.source is None:
        return None
    call = lp.branch.call if lp.branch is not None else None
    keys = sorted((k for k in trips if lp.source.named(k, call)), key=lambda k: ("@" not in k, k.isidentifier()))
    return float(trips[keys[0]]) if keys else None


# machine loops closer than this (bytes; 16 per instruction) are one unrolled loop
_UNROLL_GAP = 64 * 16


def _split_unrolled(machine: list[sass.Loop], weight: dict[int, float], trips: dict[int, float],
                    unrolled: dict[int, int], notes: list[str]) -> None:
    """A runtime loop the compiler unrolled is two or more adjacent machine loops from
    one source loop: a body of k copies and a remainder of one. Their sizes give k;
    the trip count n is split: n // k runs of the k-copy body, the rest of the
    remainder. Same-size machine loops from one source loop are separate inlined
    instances (a helper called at several places): each runs n times."""
    groups: dict[tuple, list[sass.Loop]] = collections.defaultdict(list)
    for lp in machine:
        if lp.source is not None:
            groups[(lp.source, id(lp.parent))].append(lp)
    for loops in groups.values():
        loops.sort(key=lambda lp: lp.start)
        clusters: list[list[sass.Loop]] = [[loops[0]]]
        for lp in loops[1:]:
            if lp.start - clusters[-1][-1].end <= _UNROLL_GAP:
                clusters[-1].append(lp)
            else:
                clusters.append([lp])
        for cluster in clusters:
            if len(cluster) < 2:
                continue
            smallest = min(cluster, key=lambda lp: len(lp.insns))
            factor = {id(lp): _copies(lp, smallest) for lp in cluster}
            if all(k == 1 for k in factor.values()):
                continue
            rest = trips[id(cluster[0])]
            for lp in sorted(cluster, key=lambda lp: -factor[id(lp)]):
                k = factor[id(lp)]
                runs = rest if k == 1 else float(int(rest // k))
                rest -= runs * k
                trips[id(lp)] = runs
                unrolled[id(lp)] = k
            notes.append(f"{_where(cluster[0])}: unrolled runtime loop, copies "
                         f"{sorted(factor.values(), reverse=True)}")  # fmt: skip


def _copies(big: sass.Loop, small: sass.Loop) -> int:
    """How many copies of ``small``'s body ``big`` holds: the most common ratio of
    the counts of each (source line, opcode) both have, branches aside."""
    if big is small:
        return 1
    def counts(lp: sass.Loop) -> collections.Counter:  # the loop's own branch is not copied
        return collections.Counter((i.file, i.line, i.op) for i in lp.insns if sass.category(i) != "control/sync")

    count_big, count_small = counts(big), counts(small)
    ratios = collections.Counter(round(count_big[k] / n) for k, n in count_small.items() if count_big[k])
    if not ratios:
        return max(1, round(len(big.insns) / max(len(small.insns), 1)))
    return max(1, ratios.most_common(1)[0][0])


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
        "notes": [],
    }
