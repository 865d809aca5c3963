"""Generate bench/RESULTS.md, bench/speedup.png and bench/estimate.png from
bench/results/*.json.

Each results file is pytest-benchmark JSON (``--benchmark-json``) from one GPU
run. A benchmark's ``extra_info`` is one row, or holds ``rows``: a list of them.
A row has ``workload``, ``impl`` and ``time_us``, and may have ``dtype``,
``tflops``, ``gbps``, ``fraction_of_floor``, ``images_per_s`` and the run's
``gpu``, ``torch``, ``triton``, ``cuda`` versions (else taken from the file's
machine_info). Speed-ups are computed per file, workload and dtype: over the
fastest ``eager*`` row (vit-pytorch's and timm's code), and over the fastest peer
(eager, eager_timm, torch, compiled, flex).

Files named ``estimate-*.json`` are compiler-based estimates (``python -m
vitkernels estimate``), not measurements: the newest one gets its own section
and plot, labelled as an estimate, and never shares a table with measured rows.

    python bench/make_results.py [--results DIR] [--out RESULTS.md] [--plot speedup.png]
        [--estimate-plot estimate.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# stock implementations the package competes with; every "eager*" row (vit-pytorch's
# and timm's code) is an eager baseline, and speed-ups are over the fastest of them
PEERS = ("eager", "eager_timm", "torch", "compiled", "flex")
NUMERIC = ("time_us", "tflops", "gbps", "fraction_of_floor", "images_per_s", "kernel_us", "graph_us", "host_us")


@dataclasses.dataclass
class Run:
    """One results file."""

    name: str  # file stem, e.g. "h100-2026-11-24"
    header: dict[str, str]  # gpu, torch, triton, cuda, commit, date
    rows: list[dict[str, Any]]


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}: expected a number or null, got {value!r}")
    return float(value)


def load_run(path: Path) -> Run:
    """Rows of one pytest-benchmark JSON file, with speed-ups filled in."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path}: expected pytest-benchmark JSON with a 'benchmarks' list")
    machine = data.get("machine_info") or {}
    rows: list[dict[str, Any]] = []
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info") or {}
        for i, row in enumerate(extra["rows"] if "rows" in extra else [extra]):
            where = f"{path}: benchmark {bench.get('name', '?')!r}, row {i}"
            missing = [k for k in ("workload", "impl", "time_us") if row.get(k) is None]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)} in extra_info")
            clean = {k: v for k, v in row.items() if k not in NUMERIC}
            for k in NUMERIC:
                clean[k] = _number(row.get(k), f"{where}, {k}")
            if not clean["time_us"] or clean["time_us"] <= 0:
                raise ValueError(f"{where}: time_us must be positive, got {row['time_us']!r}")
            clean.setdefault("dtype", "")
            rows.append(clean)
    first = rows[0] if rows else {}
    header = {
        "gpu": str(first.get("gpu") or machine.get("gpu") or machine.get("node") or "unknown GPU"),
        "torch": str(first.get("torch") or machine.get("torch") or "?"),
        "triton": str(first.get("triton") or machine.get("triton") or "?"),
        "cuda": str(first.get("cuda") or machine.get("cuda") or "?"),
        "commit": str((data.get("commit_info") or {}).get("id") or "?")[:10],
        "date": str(data.get("datetime") or "?")[:10],
    }
    _add_speedups(rows)
    return Run(path.stem, header, rows)


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["workload"]), str(row["dtype"])), []).append(row)
    for group in groups.values():
        eager = [r["time_us"] for r in group if str(r["impl"]).startswith("eager")]
        peers = [r["time_us"] for r in group if r["impl"] in PEERS]
        for r in group:
            r["vs_eager"] = min(eager) / r["time_us"] if eager else None
            r["vs_best_peer"] = (
                min(peers) / r["time_us"] if peers and r["impl"] not in PEERS else None
            )


def load_runs(results: Path) -> list[Run]:
    return [load_run(p) for p in sorted(results.glob("*.json")) if not p.name.startswith(ESTIMATE_PREFIX)]


# ----------------------------------------------------------------------------
# estimates (compiler-based, not measured)

ESTIMATE_PREFIX = "estimate-"
ESTIMATE_LABEL = "estimate (compiler-based, not measured)"
_CALL_KEYS = ("workload", "op", "pass", "backend", "launches", "estimate_us", "floor_us", "ratio", "bound")


def load_estimate(results: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest estimate file (by name: estimate-<arch>-<date>.json), checked."""
    paths = sorted(results.glob(f"{ESTIMATE_PREFIX}*.json"), key=lambda p: (p.stem.rsplit("-", 3)[-3:], p.name))
    if not paths:
        return None
    path = paths[-1]
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != "estimate" or not isinstance(data.get("calls"), list):
        raise ValueError(f"{path}: expected an estimate (kind 'estimate' with a 'calls' list)")
    for i, call in enumerate(data["calls"]):
        missing = [k for k in _CALL_KEYS if k not in call]
        if missing:
            raise ValueError(f"{path}: call {i}: missing {', '.join(missing)}")
    return path, data


def render_estimate(path: Path, data: dict[str, Any], plot_name: str | None) -> list[str]:
    lines = [
        f"## Estimates: {ESTIMATE_LABEL}",
        "",
        f"From `{path.name}` ({data.get('arch', '?')}; triton {data.get('triton', '?')}, torch "
        f"{data.get('torch', '?')}; commit {str(data.get('commit', '?'))[:10]}; {data.get('date', '?')}), made by "
        "`python -m vitkernels estimate` from the kernels' machine code without a GPU; the model is in "
        "bench/WORKLOADS.md. These are not measurements.",
        "",
    ]
    if plot_name:
        lines += [f"![{ESTIMATE_LABEL}: estimate / floor per workload]({plot_name})", ""]
    lines += [
        "| workload | op | pass | backend | launches | estimate (us) | floor (us) | estimate / floor | bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in data["calls"]:
        lines.append(
            f"| {c['workload']} | {c['op']} | {c['pass']} | {c['backend']} | {c['launches']} | "
            f"{c['estimate_us']:,.1f} | {c['floor_us']:,.1f} | {c['ratio']:.2f} | {c['bound']} |"
        )
    lines.append("")
    return lines


def plot_estimate(data: dict[str, Any], path: Path) -> None:
    """Estimate / floor per workload, one panel per pass, a bar per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = [p for p in ("fwd", "bwd", "fwd+bwd") if any(c["pass"] == p for c in data["calls"])]
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    for ax, which in zip(axes[0], passes, strict=True):
        calls = [c for c in data["calls"] if c["pass"] == which]
        workloads = list(dict.fromkeys(c["workload"] for c in calls))
        backends = sorted({c["backend"] for c in calls})
        width = 0.8 / max(len(backends), 1)
        for j, backend in enumerate(backends):
            xs, ys = [], []
            for i, w in enumerate(workloads):
                vals = [c["ratio"] for c in calls if c["backend"] == backend and c["workload"] == w]
                if vals:
                    xs.append(i + j * width - 0.4 + width / 2)
                    ys.append(vals[0])
            ax.bar(xs, ys, width=width, label=backend)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_ylabel("estimate / floor")
        ax.set_title(f"{which}: {ESTIMATE_LABEL}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"{ESTIMATE_LABEL}, {data.get('arch', '?')}, {data.get('date', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:{spec}}{suffix}"


COLUMNS = (
    ("workload", lambda r: str(r["workload"])),
    ("impl", lambda r: str(r["impl"])),
    ("dtype", lambda r: str(r["dtype"])),
    ("time (us)", lambda r: _fmt(r["time_us"], ",.1f")),
    ("images/s", lambda r: _fmt(r["images_per_s"], ",.0f")),
    ("TFLOP/s", lambda r: _fmt(r["tflops"], ".1f")),
    ("GB/s", lambda r: _fmt(r["gbps"], ",.0f")),
    ("of floor", lambda r: _fmt(r["fraction_of_floor"], ".0%")),
    ("vs eager", lambda r: _fmt(r["vs_eager"], ".2f", "x")),
    ("vs best peer", lambda r: _fmt(r["vs_best_peer"], ".2f", "x")),
    ("kernel (us)", lambda r: _fmt(r["kernel_us"], ",.1f")),
    ("graph (us)", lambda r: _fmt(r["graph_us"], ",.1f")),
    ("host (us)", lambda r: _fmt(r["host_us"], ",.1f")),
)
# what the last three columns are, under a run that has them (bench/gpu_run.py)
TIMES_NOTE = ("time: the median call timed by a CUDA event pair (the host's time where it is slower; "
              "ratios and the floor use it); kernel: the device time of the call's kernels "
              "(torch.profiler, summed); graph: the call replayed from a CUDA graph (no host cost); "
              "host: the host's time to issue one call. All measured.")


def render(
    runs: Sequence[Run],
    plot_name: str | None,
    estimate: tuple[Path, dict[str, Any]] | None = None,
    estimate_plot: str | None = None,
) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python bench/make_results.py` from `bench/results/*.json`; "
        "do not edit by hand. Workloads and floors: WORKLOADS.md.",
        "",
    ]
    if estimate is not None:
        lines += render_estimate(*estimate, estimate_plot)
        lines += ["## Measurements", ""]
    if not any(run.rows for run in runs):
        lines += [
            "No results yet: nothing in bench/results/ has benchmark rows. Run the "
            "benchmarks on a GPU with `--benchmark-json=bench/results/<gpu>-<yyyy-mm-dd>.json` "
            "and run this script again.",
            "",
        ]
        return "\n".join(lines)
    if plot_name:
        lines += [f"![speed-up over eager and fraction of the floor]({plot_name})", ""]
    for run in runs:
        h = run.header
        lines += [
            f"## {run.name}",
            "",
            f"{h['gpu']}; torch {h['torch']}, triton {h['triton']}, CUDA {h['cuda']}; "
            f"commit {h['commit']}; {h['date']}",
            "",
        ]
        if not run.rows:
            lines += ["(no benchmark rows in this file)", ""]
            continue
        if any(r["kernel_us"] is not None or r["host_us"] is not None for r in run.rows):
            lines += [TIMES_NOTE, ""]
        lines.append("| " + " | ".join(name for name, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for row in sorted(run.rows, key=lambda r: (str(r["workload"]), str(r["dtype"]))):
            lines.append("| " + " | ".join(cell(row) for _, cell in COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: Sequence[Run], path: Path) -> None:
    """Per results file: speed-up over eager and fraction of the floor, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.rows]
    fig, axes = plt.subplots(len(runs), 2, figsize=(16, 4.5 * len(runs)), squeeze=False)
    for (ax_s, ax_f), run in zip(axes, runs, strict=True):
        for ax, key, title, ref in (
            (ax_s, "vs_eager", "speed-up over eager", 1.0),
            (ax_f, "fraction_of_floor", "fraction of the floor", 1.0),
        ):
            rows = [
                r
                for r in run.rows
                if r[key] is not None
                and not (key == "vs_eager" and str(r["impl"]).startswith("eager"))
            ]
            workloads = sorted({str(r["workload"]) for r in rows})
            impls = sorted({str(r["impl"]) for r in rows})
            width = 0.8 / max(len(impls), 1)
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, w in enumerate(workloads):
                    vals = [r[key] for r in rows if r["impl"] == impl and str(r["workload"]) == w]
                    if vals:
                        xs.append(i + j * width - 0.4 + width / 2)
                        ys.append(max(vals))
                ax.bar(xs, ys, width=width, label=impl)
            ax.axhline(ref, color="black", linewidth=0.8)
            ax.set_xticks(range(len(workloads)), workloads, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{run.name}: {title}")
            if impls:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--plot", type=Path, default=HERE / "speedup.png")
    p.add_argument("--estimate-plot", type=Path, default=HERE / "estimate.png")
    args = p.parse_args(argv)
    try:
        runs = load_runs(args.results)
        estimate = load_estimate(args.results)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    estimate_plot = None
    if estimate is not None:
        try:
            plot_estimate(estimate[1], args.estimate_plot)
            estimate_plot = os.path.relpath(args.estimate_plot, args.out.parent)
        except ImportError:
            print("matplotlib is not installed: RESULTS.md without the estimate plot", file=sys.stderr)
    plot_name = None
    if any(run.rows for run in runs):
        try:
            plot(runs, args.plot)
            plot_name = os.path.relpath(args.plot, args.out.parent)
        except ImportError:
            print("matplotlib is not installed: RESULTS.md without the plot", file=sys.stderr)
    args.out.write_text(render(runs, plot_name, estimate, estimate_plot))
    wrote = [str(p) for p, on in ((args.out, True), (args.plot, plot_name), (args.estimate_plot, estimate_plot)) if on]
    print("wrote " + ", ".join(wrote))
    return 0


if __name__ == "__main__":
    sys.exit(main())
