"""What a target leaves for everything but the arithmetic: the compiler-based estimate
re-run with every instruction that is not arithmetic taken as free.

An ESTIMATE tool (no GPU): it reads an estimate file (`python -m vitkernels estimate`,
bench/results/estimate-sm90a-<date>.json), whose launches carry their machine code's
instruction counts by class, loop by loop. For each workload and pass it prints

- the estimate as written (max(t_mem, t_mma, t_issue) + 3 us a launch, summed over the
  call's launches),
- the same with t_issue counted from the arithmetic instructions alone (classes
  "float", "special function" and "conversion": the FMAs, adds, min/max, exponentials
  and the 16-bit packs a kernel needs for its results) and every load, store, barrier,
  shuffle, tensor-core, address and control instruction taken as free,
- the target (a multiple of the workload's floor) and the arithmetic-only estimate's
  share of it.

Where the arithmetic-only estimate is at or near the target, no rearrangement of the
same arithmetic meets it: the kernel needs less arithmetic (another algorithm), not less
overhead. Usage:

    python bench/budget.py [--estimate FILE] [--workloads M1,M2] [--fwd 2] [--fwd-bwd 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from make_results import load_estimate  # noqa: E402

from vitkernels.estimate import model  # noqa: E402
from vitkernels.workloads import WORKLOADS  # noqa: E402

ARITHMETIC = ("float", "special function", "conversion")


def arithmetic_per_warp(sass: dict) -> tuple[float, bool]:
    """(arithmetic warp instructions a program's warp executes, exact). Exact from the
    estimate's executed counts by class (estimate files made after 2026-12-05); from
    older files, approximate: each loop's instructions (its innermost ones) times its
    executions, without the estimate's weights (a branch's shorter side counted, an
    unrolled loop's copies not split)."""
    if "executed_by_class" in sass:
        return sum(sass["executed_by_class"].get(c, 0) for c in ARITHMETIC), True
    n = sum(sass.get("outside_loops_breakdown", {}).get(c, 0) for c in ARITHMETIC)
    for loop in sass.get("loops", []):
        n += loop["executions_per_program"] * sum(loop["breakdown"].get(c, 0) for c in ARITHMETIC)
    return n, False


def launch_times(launch: dict) -> tuple[float, float, bool]:
    """(the estimate as written, the arithmetic-only estimate, exact) of one launch, in
    us. A launch without machine code (a torch operation) keeps its estimate."""
    if not launch.get("sass"):
        return launch["estimate_us"], launch["estimate_us"], True
    per_warp, exact = arithmetic_per_warp(launch["sass"])
    t_issue = model.t_issue(per_warp * launch["warps"], launch["programs"]) * 1e6
    arith = max(launch["t_mem_us"], launch["t_mma_us"], t_issue) + launch["launch_us"]
    return launch["estimate_us"], arith, exact


def rows(estimate: dict, workloads: Sequence[str], targets: dict[str, float], backend: str = "triton") -> list[dict]:
    """One row per workload and pass ("fwd", "fwd+bwd"): the call's launches summed."""
    out = []
    for wid in workloads:
        sums = {}
        for which in ("fwd", "bwd"):
            launches = [la for la in estimate["launches"] if la["workload"] == wid and la["pass"] == which
                        and la["call_backend"] == backend]  # fmt: skip
            if not launches:
                break
            times = [launch_times(la) for la in launches]
            sums[which] = (sum(t[0] for t in times), sum(t[1] for t in times), len(launches),
                           all(t[2] for t in times))  # fmt: skip
        else:
            f, b = sums["fwd"], sums["bwd"]
            sums["fwd+bwd"] = (f[0] + b[0], f[1] + b[1], f[2] + b[2], f[3] and b[3])
        for which, ratio in targets.items():
            if which not in sums:
                continue
            floor = WORKLOADS[wid].floor_s(which) * 1e6
            today, arith, n, exact = sums[which]
            out.append(dict(workload=wid, which=which, launches=n, floor_us=floor, estimate_us=today,
                            arithmetic_only_us=arith, exact=exact, target_ratio=ratio, target_us=ratio * floor,
                            arithmetic_share=arith / (ratio * floor)))  # fmt: skip
    return out


def latest_estimate() -> str:
    """The newest estimate file of bench/results (make_results' choice, checked there)."""
    found = load_estimate(Path(ROOT) / "bench" / "results")
    if found is None:
        raise SystemExit("no bench/results/estimate-sm90a-*.json: run `python -m vitkernels estimate` first")
    return str(found[0])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--estimate", help="estimate JSON (default: the newest in bench/results)")
    p.add_argument("--workloads", default="M1,M2", help="comma-separated ids (default M1,M2)")
    p.add_argument("--backend", default="triton")
    p.add_argument("--fwd", type=float, default=2.0, help="forward target, a multiple of its floor")
    p.add_argument("--fwd-bwd", type=float, default=3.0, help="forward+backward target")
    a = p.parse_args(argv)
    path = a.estimate or latest_estimate()
    with open(path) as f:
        estimate = json.load(f)
    ids = [w.strip() for w in a.workloads.split(",") if w.strip()]
    unknown = [w for w in ids if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    table = rows(estimate, ids, {"fwd": a.fwd, "fwd+bwd": a.fwd_bwd}, a.backend)
    print(f"ESTIMATE (compiler-based, not measured): {os.path.relpath(path, ROOT)} "
          f"(commit {estimate.get('commit', '?')}), {a.backend} launches")  # fmt: skip
    print("| workload | pass | launches | floor us | estimate us | arithmetic only us | target us | "
          "arithmetic only / target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['workload']} | {r['which']} | {r['launches']} | {r['floor_us']:.1f} | {r['estimate_us']:.1f} | "
              f"{r['arithmetic_only_us']:.1f}{'' if r['exact'] else ' (approx.)'} | {r['target_us']:.1f} ({r['target_ratio']:g}x) | "
              f"{r['arithmetic_share']:.2f} |")  # fmt: skip
    if not all(r["exact"] for r in table):
        print("(approx.): an estimate file without executed counts by class; its loops' counts are used")
    missing = [w for w in ids if not any(r["workload"] == w for r in table)]
    if missing:
        print(f"no {a.backend} launches recorded for: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
