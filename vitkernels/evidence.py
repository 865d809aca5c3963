"""Speed evidence for automatic dispatch: is one kernel backend at least as fast as
another for an op on a GPU architecture?

Automatic dispatch takes the cuda backend only where the evidence says so
(DESIGN: "Backends and dispatch"); this module reads that evidence from the
results folder, once, and answers per (op, backend, rival, compute capability,
pass):

1. measurements, ``<gpu>-<yyyy-mm-dd>.json``: pytest-benchmark JSON of a GPU run
   (bench/gpu_run.py, bench/test_*.py). Its rows (``extra_info`` or its ``rows``)
   carry ``workload`` ("A1", "A1 fwd+bwd"), ``impl`` (the backend), ``time_us`` and
   ``dtype``; the file's ``machine_info.vitkernels`` carries the GPU's compute
   capability ("capability" or "gpu_sm", e.g. "9.0"). The newest file of the
   architecture that times both backends on the op wins.
2. until then, the compiler-based estimate, ``estimate-sm90a-<yyyy-mm-dd>.json``
   (``python -m vitkernels estimate``; its "calls" list): it speaks for compute
   capability 9.0 only, and the newest file wins.

A backend is taken when, in the chosen file, it is at least as fast as the rival
at every workload of the op both were timed on, for the pass the call needs
("fwd" without gradients, "fwd+bwd" with). Without evidence (no results folder, as
in an installed package without bench/, or nothing for this architecture) the
rival comes first, and the answer says so.

The folder is ``$VITKERNELS_RESULTS_DIR`` if set, else bench/results/ of the source
checkout this package lives in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path

import torch

RESULTS_ENV = "VITKERNELS_RESULTS_DIR"
_CHECKOUT_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
_ESTIMATE_ARCH = {"sm_90a": (9, 0), "sm_90": (9, 0)}
_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")
_DTYPE = {"bfloat16": "bf16", "bf16": "bf16", "float16": "f16", "f16": "f16", "float32": "f32", "f32": "f32"}


@dataclasses.dataclass(frozen=True)
class Timing:
    """One backend's time for one workload and pass in one evidence file."""

    op: str
    workload: str  # "A1"
    pass_: str  # "fwd", "bwd", "fwd+bwd"
    backend: str
    dtype: str  # "bf16", "f16", "f32" or ""
    time_us: float


@dataclasses.dataclass(frozen=True)
class Source:
    """One evidence file: measured on a GPU or estimated from the machine code."""

    kind: str  # "measurement" or "estimate"
    path: Path
    date: str
    capability: tuple[int, int]
    timings: tuple[Timing, ...]

    def label(self) -> str:
        try:
            shown = self.path.relative_to(_CHECKOUT_RESULTS.parents[1])
        except ValueError:
            shown = self.path
        return str(shown)


def results_dir() -> Path | None:
    """The folder evidence is read from, or None when there is none."""
    named = os.environ.get(RESULTS_ENV, "").strip()
    if named:
        return Path(named)
    return _CHECKOUT_RESULTS if _CHECKOUT_RESULTS.is_dir() else None


def _op_of(workload: str) -> str | None:
    from vitkernels.workloads import WORKLOADS

    w = WORKLOADS.get(workload)
    return w.op if w is not None else None


def _capability(text: object) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(?:sm_?)?(\d+)[._]?(\d)\s*", str(text)) if text is not None else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def _read_estimate(path: Path, data: dict) -> Source | None:
    cap = _ESTIMATE_ARCH.get(str(data.get("arch")))
    if cap is None or data.get("kind") != "estimate" or not isinstance(data.get("calls"), list):
        return None
    timings = []
    for c in data["calls"]:
        try:
            timings.append(Timing(str(c["op"]), str(c["workload"]), str(c["pass"]), str(c["backend"]),
                                  _DTYPE.get(str(c.get("dtype", "")), ""), float(c["estimate_us"])))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            continue
    return Source("estimate", path, str(data.get("date") or _date_of(path)), cap, tuple(timings))


def _read_measurement(path: Path, data: dict) -> Source | None:
    machine = data.get("machine_info") or {}
    env = machine.get("vitkernels") or {}
    cap = _capability(env.get("capability") or env.get("gpu_sm"))
    if cap is None or not isinstance(data.get("benchmarks"), list):
        return None
    timings = []
    for bench in data["benchmarks"]:
        extra = (bench or {}).get("extra_info") or {}
        for row in extra.get("rows", [extra]) if isinstance(extra, dict) else []:
            name = str(row.get("workload", ""))
            base, _, which = name.partition(" ")
            op = _op_of(base)
            t = row.get("time_us")
            if op is None or not isinstance(t, (int, float)) or isinstance(t, bool) or t <= 0:
                continue
            timings.append(Timing(op, base, which or str(row.get("pass") or "fwd"), str(row.get("impl", "")),
                                  _DTYPE.get(str(row.get("dtype", "")), ""), float(t)))  # fmt: skip
    return Source("measurement", path, _date_of(path) or str(data.get("datetime", ""))[:10], cap, tuple(timings))


def _date_of(path: Path) -> str:
    m = _DATE.search(path.name)
    return m.group(1) if m else ""


@functools.cache
def sources(folder: Path | None) -> tuple[Source, ...]:
    """Every readable evidence file of ``folder``, newest first (read once per folder)."""
    if folder is None or not folder.is_dir():
        return ()
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        src = _read_estimate(path, data) if path.name.startswith("estimate-") else _read_measurement(path, data)
        if src is not None:
            out.append(src)
    out.sort(key=lambda s: (s.date, s.path.name), reverse=True)
    return tuple(out)


def clear_cache() -> None:
    """Forget what was read (the next question reads the folder again)."""
    sources.cache_clear()
    _decide.cache_clear()


@dataclasses.dataclass(frozen=True)
class Verdict:
    take: bool  # the backend may be chosen automatically
    why: str  # one sentence: the evidence and where it is


def _fmt(t: float) -> str:
    return f"{t:.0f}" if t >= 10 else f"{t:.1f}"


@functools.cache
def _decide(op: str, backend: str, rival: str, capability: tuple[int, int], which: str, dtype: str,
            folder: Path | None) -> Verdict:  # fmt: skip
    arch = f"sm_{capability[0]}{capability[1]}"
    if folder is None:
        return Verdict(False, f"no speed evidence (no bench/results/ beside the package, as in an install "
                              f"without the bench folder): {rival} first")  # fmt: skip
    for kind in ("measurement", "estimate"):
        for src in sources(folder):
            if src.kind != kind or src.capability != capability:
                continue
            rows = [t for t in src.timings if t.op == op and t.pass_ == which and t.backend in (backend, rival)]
            dtypes = sorted({t.dtype for t in rows})
            chosen = dtype if dtype in dtypes else (dtypes[0] if dtypes else None)
            pairs = []
            for wid in sorted({t.workload for t in rows if t.dtype == chosen}):
                mine = [t.time_us for t in rows if t.workload == wid and t.dtype == chosen and t.backend == backend]
                theirs = [t.time_us for t in rows if t.workload == wid and t.dtype == chosen and t.backend == rival]
                if mine and theirs:
                    pairs.append((min(mine) / min(theirs), wid, min(mine), min(theirs)))
            if not pairs:
                continue
            what = "measured" if kind == "measurement" else "estimate"
            ratio, wid, mine_us, theirs_us = max(pairs)
            where = f"{wid} {which}"
            if ratio > 1.0:
                return Verdict(False, f"{what} {_fmt(mine_us)} us vs {rival} {_fmt(theirs_us)} us at {where} "
                                      f"({src.label()})")  # fmt: skip
            return Verdict(True, f"{what} at least as fast as {rival} at every workload ({len(pairs)}; closest: "
                                 f"{_fmt(mine_us)} us vs {_fmt(theirs_us)} us at {where}) ({src.label()})")  # fmt: skip
    return Verdict(False, f"no measurement or estimate of {backend} and {rival} for {op} ({which}) on {arch} in "
                          f"{folder}: {rival} first")  # fmt: skip


def verdict(op: str, backend: str, rival: str, capability: tuple[int, int], which: str = "fwd",
            dtype: str = "bf16") -> Verdict:  # fmt: skip
    """Whether ``backend`` may be taken before ``rival`` for ``op`` on a GPU of this
    compute capability, for pass ``which`` ("fwd" or "fwd+bwd") of ``dtype`` inputs
    ("bf16", "f16"; another dtype's rows answer when these have none)."""
    return _decide(op, backend, rival, tuple(capability), which, _DTYPE.get(dtype, dtype), results_dir())


@torch.compiler.assume_constant_result
def passed_over(op: str, backend: str, rival: str, major: int, minor: int, which: str, dtype: str) -> str:
    """"" when ``backend`` may be taken automatically, else the sentence saying why not.
    A constant to torch.compile: dispatch inside a compiled graph reads no file."""
    v = verdict(op, backend, rival, (major, minor), which, dtype)
    return "" if v.take else v.why
