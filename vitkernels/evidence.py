"""Speed evidence for automatic dispatch: is one kernel backend at least as fast as
another for an op on a GPU architecture?

Automatic dispatch takes the cuda backend only where the evidence says so
(vitkernels/ops/_dispatch.py, ``auto_if_faster_than``); this module reads that
evidence once and answers per (op, backend, rival, compute capability, pass).

Where the evidence comes from:

* the package's own table, vitkernels/speed_evidence.json (package data, so an
  installed package has it too). ``python -m vitkernels.evidence`` writes it from
  the result files of bench/results/ in a source checkout, and
  tests/test_evidence.py fails when the table and those files disagree;
* ``$VITKERNELS_RESULTS_DIR``, when set: a folder of result files read directly
  instead (your own GPU's measurements).

Two kinds of result file count:

1. measurements, ``<gpu>-<yyyy-mm-dd>.json``: pytest-benchmark JSON of a GPU run
   (bench/gpu_run.py, bench/test_*.py). Its rows (``extra_info`` or its ``rows``)
   carry ``workload`` ("A1", "A1 fwd+bwd"), ``impl`` (the backend), ``time_us`` and
   ``dtype``; the file's ``machine_info.vitkernels`` carries the GPU's compute
   capability ("capability" or "gpu_sm", e.g. "9.0") and the ``commit`` measured.
2. the compiler-based estimate, ``estimate-sm90a-<yyyy-mm-dd>.json``
   (``python -m vitkernels estimate``; its "calls" list and "commit"): it speaks
   for compute capability 9.0 only.

Which file answers: evidence about the newest kernel code comes first. With git
and the files' commits at hand, the files are ordered by their commit, newest
first, where files whose commits have the same kernel sources (csrc/ and
vitkernels/triton/) count as one code version and a measurement comes before an
estimate of it; a measurement of kernels changed since is not evidence for them.
Without that (no git, a file without a commit) measurements come before
estimates, each newest first by the date in the file name. The first file of the
GPU's architecture that times both backends on the op and pass answers.

A backend is taken when, in that file, it is at least as fast as the rival at
every workload of the op both were timed on, for the pass the call needs ("fwd"
without gradients, "fwd+bwd" with). Without evidence (no table, or nothing for
this architecture) the rival comes first, and the answer says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_ENV = "VITKERNELS_RESULTS_DIR"
TABLE = Path(__file__).resolve().with_name("speed_evidence.json")
_CHECKOUT = Path(__file__).resolve().parents[1]
_CHECKOUT_RESULTS = _CHECKOUT / "bench" / "results"
KERNEL_SOURCES = ("csrc", "vitkernels/triton")  # what a code version is, for the ordering
_ESTIMATE_ARCH = {"sm_90a": (9, 0), "sm_90": (9, 0)}
_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")
_DTYPE = {"bfloat16": "bf16", "bf16": "bf16", "float16": "f16", "f16": "f16", "float32": "f32", "f32": "f32"}
_BACKENDS = ("cuda", "triton")  # the backends the table keeps rows of


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
    commit: str = ""  # the commit measured or estimated ("" when the file names none)

    def label(self) -> str:
        try:
            shown = self.path.relative_to(_CHECKOUT)
        except ValueError:
            shown = self.path
        return str(shown)


def results_dir() -> Path | None:
    """The folder of result files named by $VITKERNELS_RESULTS_DIR, or None (the
    package's table answers)."""
    named = os.environ.get(RESULTS_ENV, "").strip()
    return Path(named) if named else None


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
    return Source("estimate", path, str(data.get("date") or _date_of(path)), cap, tuple(timings),
                  str(data.get("commit") or ""))  # fmt: skip


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
    date = _date_of(path) or str(data.get("datetime", ""))[:10]
    return Source("measurement", path, date, cap, tuple(timings), str(env.get("commit") or ""))


def _date_of(path: Path) -> str:
    m = _DATE.search(path.name)
    return m.group(1) if m else ""


def read_folder(folder: Path) -> list[Source]:
    """Every readable evidence file of ``folder``, in no particular order."""
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        src = _read_estimate(path, data) if path.name.startswith("estimate-") else _read_measurement(path, data)
        if src is not None:
            out.append(src)
    return out


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _code_version(repo: Path, commit: str) -> tuple[int, str] | None:
    """(number of commits up to ``commit``, its kernel sources' tree ids), or None
    when git does not know the commit here."""
    depth = _git(repo, "rev-list", "--count", commit) if commit else None
    if depth is None:
        return None
    trees = [_git(repo, "rev-parse", f"{commit}:{p}") or "" for p in KERNEL_SOURCES]
    return int(depth), " ".join(trees)


def order(sources: list[Source], repo: Path | None) -> tuple[Source, ...]:
    """``sources`` in the order they answer (module docstring): newest kernel code
    first when git in ``repo`` knows every file's commit, else measurements first."""
    versions = {s: _code_version(repo, s.commit) for s in sources} if repo is not None else {}
    if sources and all(versions.get(s) for s in sources):
        newest: dict[str, int] = {}
        for depth, trees in versions.values():
            newest[trees] = max(depth, newest.get(trees, 0))
        return tuple(sorted(sources, reverse=True, key=lambda s: (
            newest[versions[s][1]], s.kind == "measurement", s.date, s.path.name)))  # fmt: skip
    return tuple(sorted(sources, reverse=True, key=lambda s: (s.kind == "measurement", s.date, s.path.name)))


def table(sources: tuple[Source, ...]) -> dict:
    """The package's table (vitkernels/speed_evidence.json) of ordered sources: the
    cuda and triton rows of each, in answering order."""
    return {
        "about": "speed evidence for automatic dispatch (vitkernels/evidence.py); written by "
                 "`python -m vitkernels.evidence` from bench/results/, first source answers first",  # fmt: skip
        "sources": [{
            "kind": s.kind, "file": s.label(), "date": s.date, "commit": s.commit,
            "capability": f"{s.capability[0]}.{s.capability[1]}",
            "timings": [[t.op, t.workload, t.pass_, t.backend, t.dtype, round(t.time_us, 2)]
                        for t in s.timings if t.backend in _BACKENDS],
        } for s in sources],
    }  # fmt: skip


def _read_table(path: Path) -> tuple[Source, ...]:
    data = json.loads(path.read_text())
    out = []
    for s in data["sources"]:
        timings = tuple(Timing(str(o), str(w), str(p), str(b), str(d), float(t)) for o, w, p, b, d, t in s["timings"])
        cap = _capability(s["capability"])
        if cap is None:
            raise ValueError(f"capability {s['capability']!r} is not like '9.0'")
        out.append(Source(str(s["kind"]), _CHECKOUT / s["file"], str(s["date"]), cap, timings, str(s["commit"])))
    return tuple(out)


@functools.cache
def _load(folder: Path | None) -> tuple[tuple[Source, ...], str, str]:
    """(sources in answering order, where they are from, why there are none or "")."""
    if folder is not None:
        if not folder.is_dir():
            return (), str(folder), f"${RESULTS_ENV} names {folder}, which is not a folder"
        return order(read_folder(folder), _CHECKOUT if (_CHECKOUT / ".git").exists() else None), str(folder), ""
    try:
        return _read_table(TABLE), "vitkernels/speed_evidence.json (the package's table)", ""
    except OSError as exc:
        why = f"the package's table {TABLE} cannot be read ({exc.strerror or exc})"
    except (ValueError, KeyError, TypeError) as exc:
        why = f"the package's table {TABLE} is malformed ({type(exc).__name__}: {exc})"
    return (), str(TABLE), why


def sources() -> tuple[Source, ...]:
    """The evidence files in the order they answer (read once)."""
    return _load(results_dir())[0]


def origin() -> str:
    """Where the evidence is read from, and why there is none if there is none."""
    _, where, why = _load(results_dir())
    return f"{where} (no evidence: {why})" if why else where


def clear_cache() -> None:
    """Forget what was read (the next question reads the evidence again)."""
    _load.cache_clear()
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
    found, where, missing = _load(folder)
    if missing:
        return Verdict(False, f"no speed evidence ({missing}): {rival} first")
    return judge(found, where, op, backend, rival, capability, which, dtype)


def judge(found: tuple[Source, ...], where: str, op: str, backend: str, rival: str,
          capability: tuple[int, int], which: str, dtype: str) -> Verdict:  # fmt: skip
    """The verdict of evidence ``found`` (in answering order, read from ``where``)."""
    arch = f"sm_{capability[0]}{capability[1]}"
    for src in found:
        if src.capability != capability:
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
        what = "measured" if src.kind == "measurement" else "estimate"
        ratio, wid, mine_us, theirs_us = max(pairs)
        at = f"at {wid} {which} ({src.label()})"
        if ratio > 1.0:
            return Verdict(False, f"{what} {_fmt(mine_us)} us vs {rival} {_fmt(theirs_us)} us {at}")
        return Verdict(True, f"{what} at least as fast as {rival} at every workload ({len(pairs)}; closest: "
                             f"{_fmt(mine_us)} us vs {_fmt(theirs_us)} us {at})")  # fmt: skip
    return Verdict(False, f"no measurement or estimate of {backend} and {rival} for {op} ({which}) on {arch} in "
                          f"{where}: {rival} first")  # fmt: skip


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


def main(argv: list[str] | None = None) -> int:
    """Write vitkernels/speed_evidence.json from bench/results/ (a source checkout
    with git), and print the order the files answer in."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vitkernels.evidence", description=main.__doc__)
    parser.add_argument("--check", action="store_true", help="only say whether the table is up to date")
    args = parser.parse_args(argv)
    if not _CHECKOUT_RESULTS.is_dir():
        print(f"error: no {_CHECKOUT_RESULTS} here; run this in a source checkout", file=sys.stderr)
        return 2
    text = render(order(read_folder(_CHECKOUT_RESULTS), _CHECKOUT))
    if args.check:
        current = TABLE.read_text() if TABLE.is_file() else ""
        print(f"{TABLE}: {'up to date' if current == text else 'stale; run python -m vitkernels.evidence'}")
        return 0 if current == text else 1
    TABLE.write_text(text)
    for s in _read_table(TABLE):
        print(f"{s.kind:<11} sm_{s.capability[0]}{s.capability[1]}  {s.commit[:10] or '?':<10}  {s.label()}")
    return 0


def render(sources: tuple[Source, ...]) -> str:
    """The table's file text."""
    data = table(sources)
    parts = []
    for src in data["sources"]:
        head = json.dumps({k: v for k, v in src.items() if k != "timings"})[:-1]
        rows = ",\n".join("   " + json.dumps(row) for row in src["timings"])
        parts.append(f'  {head}, "timings": [\n{rows}\n  ]}}')
    return '{\n "about": ' + json.dumps(data["about"]) + ',\n "sources": [\n' + ",\n".join(parts) + "\n ]\n}\n"


if __name__ == "__main__":
    sys.exit(main())
