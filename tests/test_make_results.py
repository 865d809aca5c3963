"""bench/make_results.py on synthetic pytest-benchmark JSON."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "make_results.py"
_spec = importlib.util.spec_from_file_location("make_results", _PATH)
make_results = sys.modules["make_results"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_results)


def _bench(name, **row):
    return {"name": name, "stats": {"median": row["time_us"] / 1e6}, "extra_info": row}


def _write(path: Path, benchmarks, **top) -> None:
    path.write_text(json.dumps({"machine_info": {"node": "box"}, "benchmarks": benchmarks, **top}))


def _paths(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    return results, tmp_path / "RESULTS.md", tmp_path / "speedup.png"


def test_empty_results_folder_gives_a_page_saying_so(tmp_path):
    results, out, png = _paths(tmp_path)
    assert (
        make_results.main(["--results", str(results), "--out", str(out), "--plot", str(png)]) == 0
    )
    text = out.read_text()
    assert "No results yet" in text and "|" not in text
    assert not png.exists()


def test_rows_speedups_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    results, out, png = _paths(tmp_path)
    t_eager = random.uniform(100, 1000)
    t_comp = t_eager / random.uniform(1.2, 2.0)
    t_opt = t_eager / random.uniform(2.0, 4.0)
    model_rows = [
        _bench(f"levit[{impl}]", workload="LeViT-256 [timm]", impl=impl, dtype="bfloat16",
               time_us=t, images_per_s=256 / (t * 1e-6), tflops=None, gbps=None,
               fraction_of_floor=None, gpu="NVIDIA H100", torch="2.11", triton="3.6", cuda="13.0")
        for impl, t in (("eager", t_eager), ("compiled", t_comp), ("optimized", t_opt))
    ]  # fmt: skip
    op_rows = {  # one benchmark carrying several rows
        "name": "relpos[A1]",
        "extra_info": {
            "rows": [
                {"workload": "A1", "impl": "eager", "dtype": "bfloat16", "time_us": 100.0,
                 "tflops": 75.5, "gbps": 770.0, "fraction_of_floor": 0.26},
                {"workload": "A1", "impl": "triton", "dtype": "bfloat16", "time_us": 40.0,
                 "tflops": 188.8, "gbps": 1925.0, "fraction_of_floor": 0.65},
            ]
        },
    }  # fmt: skip
    _write(results / "h100-2026-01-02.json", [*model_rows, op_rows],
           commit_info={"id": "0123456789abcdef"}, datetime="2026-01-02T10:00:00")  # fmt: skip
    assert (
        make_results.main(["--results", str(results), "--out", str(out), "--plot", str(png)]) == 0
    )

    text = out.read_text()
    assert "## h100-2026-01-02" in text
    assert "NVIDIA H100; torch 2.11, triton 3.6, CUDA 13.0; commit 0123456789; 2026-01-02" in text
    assert "![speed-up over eager and fraction of the floor](speedup.png)" in text
    lines = {tuple(c.strip() for c in line.strip("|").split("|")) for line in text.splitlines()}
    opt = [row for row in lines if row[:2] == ("LeViT-256 [timm]", "optimized")]
    assert len(opt) == 1
    assert opt[0][3] == f"{t_opt:,.1f}"
    assert opt[0][4] == f"{256 / (t_opt * 1e-6):,.0f}"
    assert opt[0][8] == f"{t_eager / t_opt:.2f}x"  # over eager
    assert opt[0][9] == f"{t_comp / t_opt:.2f}x"  # over the best peer (compiled)
    triton = [row for row in lines if row[:2] == ("A1", "triton")]
    assert triton and triton[0][7] == "65%" and triton[0][8] == "2.50x"
    eager = [row for row in lines if row[:2] == ("A1", "eager")]
    assert eager[0][8] == "1.00x" and eager[0][9] == ""  # a peer has no "vs best peer"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_kernel_graph_and_host_times_get_their_columns(tmp_path):
    """gpu_run's rows carry the kernels' device time, a graph replay and the host's time
    beside the event time: each in its own column, blank where a row has none, and the
    note that says what they are only under a run that has them."""
    results, out, png = _paths(tmp_path)
    k, g, h = (random.uniform(10, 900) for _ in range(3))
    rows = [
        _bench("m1[triton]", workload="M1", impl="triton", dtype="bfloat16", time_us=h + 1.0,
               kernel_us=k, graph_us=g, host_us=h),
        _bench("m1[eager]", workload="M1", impl="eager", dtype="bfloat16", time_us=2 * h),
    ]  # fmt: skip
    _write(results / "h200-2026-12-04.json", rows)
    _write(results / "h200-2026-11-29.json", [_bench("a1", workload="A1", impl="eager", time_us=5.0)])
    assert make_results.main(["--results", str(results), "--out", str(out), "--plot", str(png)]) == 0
    text = out.read_text()
    lines = [tuple(c.strip() for c in ln.strip("|").split("|")) for ln in text.splitlines() if ln.startswith("|")]
    header = lines[0]
    assert header[-3:] == ("kernel (us)", "graph (us)", "host (us)")
    triton = [r for r in lines if r[:2] == ("M1", "triton")][0]
    assert triton[-3:] == (f"{k:,.1f}", f"{g:,.1f}", f"{h:,.1f}")
    assert [r for r in lines if r[:2] == ("M1", "eager")][0][-3:] == ("", "", "")
    assert text.count(make_results.TIMES_NOTE) == 1  # under 2026-12-04 only
    assert text.index(make_results.TIMES_NOTE) > text.index("## h200-2026-12-04")


def test_fastest_eager_row_is_the_baseline(tmp_path):
    """vit-pytorch's and timm's eager code both count as eager (and as peers)."""
    results, out, png = _paths(tmp_path)
    t_vp, t_timm, t_triton = 300.0, random.uniform(100, 250), 50.0
    rows = [{"workload": "A1", "impl": impl, "dtype": "bfloat16", "time_us": t}
            for impl, t in (("eager", t_vp), ("eager_timm", t_timm), ("triton", t_triton))]
    _write(results / "run.json", [{"name": "relpos[A1]", "extra_info": {"rows": rows}}])
    assert make_results.main(["--results", str(results), "--out", str(out), "--plot", str(png)]) == 0
    lines = {tuple(c.strip() for c in line.strip("|").split("|")) for line in out.read_text().splitlines()}
    triton = [row for row in lines if row[:2] == ("A1", "triton")]
    assert triton[0][8] == f"{t_timm / t_triton:.2f}x"  # over the faster eager
    assert triton[0][9] == f"{t_timm / t_triton:.2f}x"  # the best peer
    timm = [row for row in lines if row[:2] == ("A1", "eager_timm")]
    assert timm[0][9] == ""  # a peer has no "vs best peer"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"impl": "eager", "time_us": 1.0}, "missing workload"),
        ({"workload": "A1", "impl": "eager", "time_us": "fast"}, "time_us: expected a number"),
        ({"workload": "A1", "impl": "eager", "time_us": 0.0}, "time_us must be positive"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, message, capsys):
    results, out, png = _paths(tmp_path)
    _write(results / "bad.json", [{"name": "b", "extra_info": row}])
    assert (
        make_results.main(["--results", str(results), "--out", str(out), "--plot", str(png)]) == 2
    )
    err = capsys.readouterr().err
    assert "bad.json" in err and "'b'" in err and message in err
    assert not out.exists()


def test_not_benchmark_json_is_refused(tmp_path):
    results, _, _ = _paths(tmp_path)
    (results / "x.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="x.json: expected pytest-benchmark JSON"):
        make_results.load_runs(results)


def test_estimate_gets_its_own_labelled_section(tmp_path):
    """An estimate file (estimate-*.json) is shown in its own section, labelled as an
    estimate, never among the measured rows; a malformed one is refused by name."""
    pytest.importorskip("matplotlib")
    results, out, png = _paths(tmp_path)
    est_png = tmp_path / "estimate.png"
    calls = [
        {"workload": "A1", "op": "relpos_attention", "pass": p, "backend": "triton", "dtype": "bf16",
         "launches": n, "estimate_us": e, "floor_us": f, "ratio": e / f, "bound": "issue"}
        for p, n, e, f in (("fwd", 1, 80.5, 17.9), ("bwd", 9, 297.0, 36.0))
    ]  # fmt: skip
    (results / "estimate-sm90a-2026-01-02.json").write_text(json.dumps(
        {"kind": "estimate", "arch": "sm_90a", "date": "2026-01-02", "commit": "abc", "triton": "3.9",
         "torch": "2.13", "model": {}, "launches": [], "calls": calls}))  # fmt: skip
    measured = _bench("relpos[A1]", workload="A1", impl="triton", dtype="bfloat16", time_us=55.5)
    _write(results / "h200-2026-01-02.json", [measured])
    args = ["--results", str(results), "--out", str(out), "--plot", str(png), "--estimate-plot", str(est_png)]
    assert make_results.main(args) == 0
    text = out.read_text()
    head, measurements = text.split("## Measurements")
    assert "estimate (compiler-based, not measured)" in head and "| A1 | relpos_attention | fwd | triton | 1 | 80.5 |" in head
    assert "55.5" not in head and "80.5" not in measurements and "55.5" in measurements
    assert est_png.exists() and png.exists()
    (results / "estimate-sm90a-2026-01-03.json").write_text(json.dumps({"kind": "estimate", "calls": [{}]}))
    assert make_results.main(args) == 2
