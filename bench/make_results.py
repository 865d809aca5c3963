"""Generate bench/RESULTS.md and bench/speedup.png from bench/results/*.json.

Each results file is pytest-benchmark JSON (``--benchmark-json``) from one GPU
run. A benchmark's ``extra_info`` is one row, or holds ``rows``: a list of them.
A row has ``workload``, ``impl`` and ``time_us``, and may have ``dtype``,
``tflops``, ``gbps``, ``fraction_of_floor``, ``images_per_s`` and the run's
``gpu``, ``torch``, ``triton``, ``cuda`` versions (else taken from the file's
machine_info). Speed-ups are computed per file, workload and dtype: over the
fastest ``eager*`` row (vit-pytorch's and timm's code), and over the fastest peer
(eager, eager_timm, torch, compiled, flex).

    python bench/make_results.py [--results DIR] [--out RESULTS.md] [--plot speedup.png]
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
NUMERIC = ("time_us", "tflops", "gbps", "fraction_of_floor", "images_per_s")


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
    return [load_run(p) for p in sorted(results.glob("*.json"))]


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
)


def render(runs: Sequence[Run], plot_name: str | None) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python bench/make_results.py` from `bench/results/*.json`; "
        "do not edit by hand. Workloads and floors: WORKLOADS.md.",
        "",
    ]
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
    args = p.parse_args(argv)
    try:
        runs = load_runs(args.results)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plot_name = None
    if any(run.rows for run in runs):
        try:
            plot(runs, args.plot)
            plot_name = os.path.relpath(args.plot, args.out.parent)
        except ImportError:
            print("matplotlib is not installed: RESULTS.md without the plot", file=sys.stderr)
    args.out.write_text(render(runs, plot_name))
    print(f"wrote {args.out}" + (f" and {args.plot}" if plot_name else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
