"""bench/budget.py (the arithmetic-only estimate) on synthetic estimate files (the
estimate's executed counts by class are checked by hand in test_estimate.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("budget", ROOT / "bench" / "budget.py")
budget = sys.modules["budget"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(budget)

CLASSES = ["float", "special function", "conversion", "global memory", "shared memory", "tensor core",
           "control/sync", "integer/address", "move/shuffle", "uniform"]  # fmt: skip


def _breakdown(rng):
    return {c: rng.randrange(0, 300) for c in CLASSES if rng.random() < 0.9}


def _sass(rng, exact=True):
    """Older files (exact=False) have only the loops' static counts."""
    loops = [dict(executions_per_program=float(rng.randrange(1, 20)), breakdown=_breakdown(rng))
             for _ in range(rng.randrange(0, 4))]  # fmt: skip
    out = dict(outside_loops_breakdown=_breakdown(rng), loops=loops)
    if exact:
        out["executed_by_class"] = {c: rng.uniform(0, 5000) for c in CLASSES if rng.random() < 0.9}
    return out


def _pick(b):
    return b.get("float", 0) + b.get("special function", 0) + b.get("conversion", 0)


def _arith(sass):
    """Independent of budget.py: float + special function + conversion executed; from the
    loops' counts where the file has no executed counts by class."""
    if "executed_by_class" in sass:
        return _pick(sass["executed_by_class"])
    return _pick(sass["outside_loops_breakdown"]) + sum(lp["executions_per_program"] * _pick(lp["breakdown"])
                                                        for lp in sass["loops"])  # fmt: skip


def _launch(rng, wid, which, sass=True, exact=True, **over):
    la = dict(workload=wid, op="head_mixing_attention", call_backend="triton", programs=rng.randrange(1, 3000),
              warps=rng.choice([4, 8]), t_mem_us=rng.uniform(1, 50), t_mma_us=rng.uniform(1, 50),
              t_issue_us=rng.uniform(50, 90), launch_us=3.0, sass=_sass(rng, exact) if sass else None)  # fmt: skip
    la["pass"] = which
    la["estimate_us"] = max(la["t_mem_us"], la["t_mma_us"], la["t_issue_us"]) + 3.0
    la.update(over)
    return la


def _t_issue_us(arith_per_warp, warps, programs):
    return math.ceil(programs / 132) * arith_per_warp * warps / (4 * 1.98e9) * 1e6


def test_arithmetic_counts_the_three_classes_weighted_by_the_loops():
    rng = random.Random()
    for i in range(50):
        sass = _sass(rng, exact=i % 2 == 0)
        n, exact = budget.arithmetic_per_warp(sass)
        assert n == pytest.approx(_arith(sass)) and exact == (i % 2 == 0)


def test_a_launch_keeps_its_memory_and_tensor_core_times():
    rng = random.Random()
    for _ in range(50):
        la = _launch(rng, "M1", "fwd")
        today, arith, exact = budget.launch_times(la)
        assert exact
        t_issue = _t_issue_us(_arith(la["sass"]), la["warps"], la["programs"])
        assert today == la["estimate_us"]
        assert arith == pytest.approx(max(la["t_mem_us"], la["t_mma_us"], t_issue) + 3.0)
    # a torch operation (no machine code) keeps its estimate
    la = _launch(rng, "M1", "bwd", sass=False)
    assert budget.launch_times(la) == (la["estimate_us"], la["estimate_us"], True)


def test_rows_sum_a_calls_launches_and_compare_with_the_target():
    rng = random.Random()
    fwd = [_launch(rng, "M1", "fwd")]
    bwd = [_launch(rng, "M1", "bwd"), _launch(rng, "M1", "bwd", sass=False), _launch(rng, "M1", "bwd", exact=False)]
    other = [_launch(rng, "M1", "fwd", call_backend="cuda"), _launch(rng, "M2", "fwd")]  # not counted / no bwd
    est = {"launches": other + fwd + bwd}
    rows = budget.rows(est, ["M1", "M2"], {"fwd": 2.0, "fwd+bwd": 3.0})
    by = {(r["workload"], r["which"]): r for r in rows}
    assert set(by) == {("M1", "fwd"), ("M1", "fwd+bwd"), ("M2", "fwd")}
    times = [budget.launch_times(la) for la in fwd + bwd]
    r = by[("M1", "fwd+bwd")]
    assert r["launches"] == 4
    assert r["estimate_us"] == pytest.approx(sum(la["estimate_us"] for la in fwd + bwd))
    assert r["arithmetic_only_us"] == pytest.approx(sum(t[1] for t in times))
    floor = budget.WORKLOADS["M1"].floor_s("fwd+bwd") * 1e6
    assert r["target_us"] == pytest.approx(3.0 * floor)
    assert r["arithmetic_share"] == pytest.approx(r["arithmetic_only_us"] / (3.0 * floor))
    assert by[("M1", "fwd")]["arithmetic_only_us"] == pytest.approx(times[0][1])
    # one launch read from loop counts makes the sum approximate, and only that one
    assert by[("M1", "fwd")]["exact"] and not r["exact"] and by[("M2", "fwd")]["exact"]


def test_main_prints_the_table_and_names_bad_workloads(tmp_path, capsys):
    rng = random.Random()
    path = tmp_path / "est.json"
    path.write_text(json.dumps({"commit": "abc", "launches": [_launch(rng, "M3", "fwd"), _launch(rng, "M3", "bwd")]}))
    assert budget.main(["--estimate", str(path), "--workloads", "M3,A1"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "| M3 | fwd | 1 |" in out and "| M3 | fwd+bwd | 2 |" in out
    assert "approx" not in out
    assert "no triton launches recorded for: A1" in out
    with pytest.raises(SystemExit):
        budget.main(["--estimate", str(path), "--workloads", "M9"])
    assert "unknown workload" in capsys.readouterr().err
