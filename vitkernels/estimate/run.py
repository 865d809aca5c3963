"""``python -m vitkernels estimate``: the compiler-based estimate of every launch of
the reference workloads on an H200 (sm_90a), without a GPU.

For each workload (vitkernels.workloads: A1-A5, T1-T2, P1-P3; batch 256,
bfloat16), each pass (forward, backward) and each kernel backend:

* triton: the launchers run on meta tensors inside ``recording()``; every launch
  is compiled for sm_90a with Triton's own specialisation (_aot.compile_launch);
* cuda: the extension's launch logic records its launches (cuda.py) and nvcc
  compiles csrc/kernels for sm_90a (patch_embed has no CUDA backward: the cuda
  backend's backward is Triton's, and is estimated as such);

then disassembles each kernel and applies the model (model.py, analysis.py).
patch_embed's forward writes more when a gradient will follow (what its backward
reads): "fwd" is the inference forward, "bwd" the backward after a forward that
saved, and "fwd+bwd" sums that saving forward (its launches listed under pass
"fwd+bwd") and the backward; the cuda backend's saving forward (the extension's
patch_embed_fwd_saving) writes the same tensors as Triton's, so its backward is
Triton's "bwd" too, and its "fwd+bwd" that saving forward's launches and it.
Writes bench/results/estimate-sm90a-<date>.json (in a source checkout; else the
current folder) and prints a table. An estimate is not a measurement.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ARCH = 90
DTYPE_NAME = "bf16"
PASSES = ("fwd", "bwd")
# the recording (patch_embed's record_calls direction, Triton's and the CUDA extension's)
# of the forward a fwd+bwd call runs where it differs from the inference forward
SAVING_FWD = {"patch_embed": "fwd_saving"}


def _say(msg: str) -> None:
    print(f"[estimate] {msg}", file=sys.stderr, flush=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def default_output(date: str) -> Path:
    bench = Path(__file__).resolve().parents[2] / "bench"
    folder = bench / "results" if bench.is_dir() else Path.cwd()
    return folder / f"estimate-sm90a-{date}.json"


# ----------------------------------------------------------------------------
# triton


class _TritonCodes:
    """Compiled, disassembled Triton launches, one per distinct specialisation."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.codes: dict[str, Any] = {}

    @staticmethod
    def key(launch) -> str:
        return launch.specialization.key() + repr(launch.kernel)

    def compile_all(self, launches: list) -> None:
        from vitkernels.estimate import analysis, sass
        from vitkernels.triton._aot import compile_launch, cubin_tool

        todo = {}
        for la in launches:
            todo.setdefault(self.key(la), la)
        todo = {k: la for k, la in todo.items() if k not in self.codes}

        def build(la):
            c = compile_launch(la, ARCH)
            funcs = sass.parse(cubin_tool("nvdisasm", c.cubin, "-c", "-gi"))
            f = funcs.get(la.kernel.fn.__name__) or next(iter(funcs.values()))
            stores, loads = sass.spill_bytes(f.insns)
            return analysis.Code("triton", f, c.registers, c.static_shared, stores, loads), c

        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            futures = {pool.submit(build, la): k for k, la in todo.items()}
            for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                key = futures[fut]
                code, compiled = fut.result()
                self.codes[key] = (code, compiled)
                _say(f"compiled {i}/{len(todo)}: {todo[key].name} ({code.registers} registers)")


def _triton_launch(codes: _TritonCodes, la) -> dict[str, Any]:
    from vitkernels.estimate import analysis

    code, compiled = codes.codes[codes.key(la)]
    r, w = la.bytes_moved()
    out = analysis.analyse(code, programs=la.programs, warps=la.num_warps, dynamic_shared=compiled.shared_bytes,
                           trips=la.loops, bytes_read=r, bytes_written=w)  # fmt: skip
    opts = la.specialization.options
    out.update(name=la.name, grid=list(la.grid), specialization=la.specialization.describe(),
               options={k: opts.get(k) for k in ("num_warps", "num_stages", "enable_fp_fusion")})  # fmt: skip
    return out


# ----------------------------------------------------------------------------
# cuda


def _cuda_launch(la, functions: dict, usage: dict, mangled: dict) -> dict[str, Any]:
    from vitkernels.estimate import analysis, sass

    f = functions.get(la.kernel)
    if f is None:
        raise RuntimeError(f"{la.kernel}: not in the nvcc cubin (kernels there: {sorted(functions)[:8]} ...)")
    res = usage[mangled[la.kernel]]
    stores, loads = sass.spill_bytes(f.insns)
    code = analysis.Code("cuda", f, res["registers"], res["static_shared"], stores, loads)
    out = analysis.analyse(code, programs=la.programs, warps=la.warps, dynamic_shared=la.dynamic_shared,
                           trips=la.trips, bytes_read=la.bytes_read, bytes_written=la.bytes_written)  # fmt: skip
    out.update(kernel=la.kernel, name=la.kernel.removeprefix("vk::"), grid=list(la.grid), block=list(la.block))
    return out


# ----------------------------------------------------------------------------
# calls


def _call(workload, which: str, backend: str, launches: list[dict[str, Any]]) -> dict[str, Any]:
    from vitkernels.estimate import model

    totals = {"mem": 0.0, "mma": 0.0, "issue": 0.0}
    for la in launches:
        totals[la["bound"]] += la["estimate_us"] - la["launch_us"]
    est = sum(la["estimate_us"] for la in launches)
    floor = workload.floor_s(which) * 1e6
    return {
        "workload": workload.id,
        "op": workload.op,
        "pass": which,
        "backend": backend,
        "dtype": DTYPE_NAME,
        "launches": len(launches),
        "estimate_us": est,
        "floor_us": floor,
        "ratio": est / floor,
        "bound": max(totals, key=lambda k: totals[k]),
        "bound_us": totals,
        "launch_overhead_us": len(launches) * model.LAUNCH_S * 1e6,
        "floor_bound": workload.bound(which),
        "warnings": sorted({w for la in launches for w in la["warnings"]}),
    }


def _triton_refusal(workload: Any) -> str | None:
    """Why the Triton kernels do not take this workload (None: they do)."""
    from vitkernels.workloads import HeadMixingShape

    if isinstance(workload.shape, HeadMixingShape):
        from vitkernels.triton._aot import head_mixing_refusal

        return head_mixing_refusal(workload.shape)
    return None


def _triton_passes(workload: Any, passes: tuple[str, ...]) -> tuple[str, ...]:
    """The passes of ``passes`` the Triton kernels run for this workload (head mixing:
    ``directions``, both at every head count the kernels take)."""
    from vitkernels.workloads import HeadMixingShape

    if isinstance(workload.shape, HeadMixingShape):
        from vitkernels.triton.head_mixing import directions

        return tuple(p for p in passes if p in directions(workload.shape))
    return passes


def estimate(
    workloads: list[str] | None = None,
    backends: tuple[str, ...] = ("triton", "cuda"),
    jobs: int | None = None,
    passes: tuple[str, ...] = PASSES,
) -> dict[str, Any]:
    """The estimate as a JSON-ready dict (see the module docstring)."""
    os.environ.pop("TRITON_INTERPRET", None)  # before vitkernels.triton is imported
    relpos = sys.modules.get("vitkernels.triton.relpos")
    if relpos is not None and type(relpos._fwd_kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("the Triton kernels were imported under TRITON_INTERPRET=1, which cannot compile "
                           "them; run the estimate in a process without it")  # fmt: skip
    import torch
    import triton

    from vitkernels.estimate import analysis, model
    from vitkernels.triton._aot import record_workload
    from vitkernels.triton._common import TorchOp
    from vitkernels.workloads import WORKLOADS

    chosen = [WORKLOADS[w] for w in (workloads or list(WORKLOADS))]
    launches_out: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    notes: list[str] = []

    recorded = {}
    if "triton" in backends or "cuda" in backends:
        for w in chosen:
            refused = _triton_refusal(w)
            if refused:  # dispatch runs the torch backend there: nothing to estimate
                notes.append(f"{w.id}: no Triton launch ({refused}; the torch backend runs it)")
                _say(notes[-1])
                continue
            own = _triton_passes(w, passes)
            for which in passes:
                if which not in own:
                    notes.append(f"{w.id} {which}: no Triton launch (the kernels do not run this direction "
                                 f"at {w.shape.heads} heads; the torch backend runs it)")
                    _say(notes[-1])
            extra = []
            if "fwd" in own and "bwd" in own and w.op in SAVING_FWD:
                extra.append(SAVING_FWD[w.op])
            for which in (*own, *extra):
                recorded[(w.id, which)] = record_workload(w.shape, which, torch.bfloat16, arch=ARCH)
        _say(f"recorded {sum(len(r.launches) for r in recorded.values())} Triton launches")
        codes = _TritonCodes(jobs or os.cpu_count() or 1)
        codes.compile_all([la for r in recorded.values() for la in r.launches])

    def triton_events(w, which: str) -> list[dict[str, Any]]:
        out = []
        for ev in recorded[(w.id, which)].events:
            out.append(analysis.torch_op(ev.name, ev.bytes_read, ev.bytes_written) if isinstance(ev, TorchOp)
                       else _triton_launch(codes, ev))  # fmt: skip
        return out

    per_pass: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    if "triton" in backends:
        for w in chosen:
            for which in passes:
                if (w.id, which) in recorded:
                    per_pass[(w.id, which, "triton")] = triton_events(w, which)

    if "cuda" in backends:
        from vitkernels.estimate import cuda

        reason = cuda.unavailable_reason()
        if reason:
            notes.append(f"cuda backend not estimated: {reason}")
            _say(notes[-1])
        else:
            _say("compiling csrc/kernels for sm_90a (nvcc) and building the launch recorder (g++)")
            functions = cuda.device_functions(ARCH)
            usage = cuda.resource_usage(ARCH)
            names = list(usage)
            plain = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
            mangled = {cuda.normalise(p): m for m, p in zip(names, plain.splitlines(), strict=True)}

            def cuda_events(w, which: str) -> list[dict[str, Any]]:
                events = []
                for ev in cuda.record_calls(w.shape, w.batch, torch.bfloat16, which):
                    if isinstance(ev, cuda.TorchEvent):
                        events.append(analysis.torch_op(ev.name, ev.bytes_read, ev.bytes_written))
                    else:
                        events.append(_cuda_launch(ev, functions, usage, mangled))
                return events

            for w in chosen:
                if w.op == "head_mixing_attention":  # no CUDA kernels
                    continue
                for which in passes:
                    if w.op == "patch_embed" and which == "bwd":  # no CUDA backward: Triton's
                        per_pass[(w.id, which, "cuda")] = triton_events(w, which)
                        continue
                    per_pass[(w.id, which, "cuda")] = cuda_events(w, which)

    for (wid, which, backend), events in per_pass.items():
        w = WORKLOADS[wid]
        for ev in events:
            launches_out.append({"workload": wid, "op": w.op, "pass": which, "call_backend": backend, **ev})
        calls.append(_call(w, which, backend, events))
    for w in chosen:
        for backend in backends:
            if all((w.id, p, backend) in per_pass for p in PASSES):
                fwd = per_pass[(w.id, "fwd", backend)]
                saving = None
                if backend == "triton" and (w.id, SAVING_FWD.get(w.op)) in recorded:
                    saving = triton_events(w, SAVING_FWD[w.op])
                elif backend == "cuda" and w.op in SAVING_FWD:  # the extension's saving forward
                    saving = cuda_events(w, SAVING_FWD[w.op])
                if saving is not None:
                    fwd = saving
                    for ev in fwd:
                        launches_out.append({"workload": w.id, "op": w.op, "pass": "fwd+bwd", "call_backend": backend,
                                             **ev})  # fmt: skip
                calls.append(_call(w, "fwd+bwd", backend, fwd + per_pass[(w.id, "bwd", backend)]))
    calls.sort(key=lambda c: (list(WORKLOADS).index(c["workload"]), ("fwd", "bwd", "fwd+bwd").index(c["pass"]),
                              c["backend"]))  # fmt: skip
    from vitkernels.workloads import BANDWIDTH_BYTES_PER_S, MATMUL_FLOPS_PER_S

    return {
        "kind": "estimate",
        "arch": f"sm_{ARCH}a",
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "label": "estimate (compiler-based, not measured)",
        "model": {**model.constants(), "floor_bandwidth_bytes_per_s": BANDWIDTH_BYTES_PER_S,
                  "floor_matmul_flops_per_s": MATMUL_FLOPS_PER_S, "batch": chosen[0].batch if chosen else None,
                  "dtype": DTYPE_NAME},  # fmt: skip
        "notes": notes,
        "launches": launches_out,
        "calls": calls,
    }


# ----------------------------------------------------------------------------
# the table


def _main_loop(la: dict[str, Any]) -> str:
    loops = la.get("sass", {}).get("loops") or []
    if not loops:
        return ""
    lp = max(loops, key=lambda x: x["executions_per_program"] * x["insns_per_iteration"])
    return f"{lp['insns_per_iteration']} x{lp['executions_per_program']:g}"


def render(result: dict[str, Any]) -> str:
    """Readable tables: per op call, then per launch."""
    lines = [f"{result['label']}: {result['arch']}, triton {result['triton']}, torch {result['torch']}, "
             f"commit {result['commit'][:10]}", ""]  # fmt: skip
    head = f"{'call':<22}{'backend':<8}{'launches':>9}{'estimate us':>13}{'floor us':>10}{'ratio':>7}  bound"
    lines += [head, "-" * len(head)]
    for c in result["calls"]:
        name = f"{c['workload']} {c['op'].split('_')[0]} {c['pass']}"
        lines.append(f"{name:<22}{c['backend']:<8}{c['launches']:>9}{c['estimate_us']:>13.1f}{c['floor_us']:>10.1f}"
                     f"{c['ratio']:>7.2f}  {c['bound']}" + ("  (warnings)" if c["warnings"] else ""))  # fmt: skip
    lines += ["", "per launch (loop: instructions per iteration x executions per program)"]
    head = (f"{'workload':<9}{'pass':<8}{'kernel':<34}{'progs':>7}{'regs':>5}{'smem KB':>8}{'occ':>5}{'waves':>7}"
            f"{'tensor core':>22}{'loop':>12}{'t_mem':>7}{'t_mma':>7}{'t_iss':>7}{'est us':>8}")  # fmt: skip
    lines += [head, "-" * len(head)]
    for la in result["launches"]:
        if la["backend"] == "torch":
            lines.append(f"{la['workload']:<9}{la['pass']:<8}{'torch ' + la['kernel']:<34}{'':>7}{'':>5}{'':>8}"
                         f"{'':>5}{'':>7}{'':>22}{'':>12}{la['t_mem_us']:>7.1f}{'':>7}{'':>7}{la['estimate_us']:>8.1f}")  # fmt: skip
            continue
        tc = la["tensor_core"]
        tcs = f"{tc['kind']} {tc['executed_per_program']:g}" if tc["kind"] != "none" else "none"
        name = la["name"]
        lines.append(
            f"{la['workload']:<9}{la['pass']:<8}{name[:33]:<34}{la['programs']:>7}{la['registers']:>5}"
            f"{la['shared_bytes'] / 1024:>8.1f}{la['occupancy']['programs_per_sm']:>5}{la['waves']:>7.2f}{tcs:>22}"
            f"{_main_loop(la):>12}{la['t_mem_us']:>7.1f}{la['t_mma_us']:>7.1f}{la['t_issue_us']:>7.1f}"
            f"{la['estimate_us']:>8.1f}"
        )  # fmt: skip
    warnings = sorted({w for la in result["launches"] for w in la["warnings"]})
    if warnings or result["notes"]:
        lines += ["", "warnings:"] + [f"  {w}" for w in [*result["notes"], *warnings]]
    return "\n".join(lines)


def estimate_main(argv: list[str]) -> int:
    from vitkernels.workloads import WORKLOADS

    p = argparse.ArgumentParser(
        prog="python -m vitkernels estimate",
        description="Compiler-based estimate (not a measurement) of every launch of the reference workloads "
        "on an H200 (sm_90a), from the machine code; no GPU needed.",
    )
    p.add_argument("--workloads", help=f"comma-separated ids (default all: {','.join(WORKLOADS)})")
    p.add_argument("--backends", default="triton,cuda", help="comma-separated: triton, cuda (default both)")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/estimate-sm90a-<date>.json)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--jobs", type=int, help="parallel compiles (default: CPU count)")
    p.add_argument("--passes", default="fwd,bwd", help="comma-separated: fwd, bwd (default both)")
    args = p.parse_args(argv)
    wl = [w.strip() for w in args.workloads.split(",")] if args.workloads else None
    unknown = [w for w in wl or [] if w not in WORKLOADS]
    if unknown:
        print(f"error: --workloads: unknown {', '.join(unknown)}; expected ids from {', '.join(WORKLOADS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    bad = [b for b in backends if b not in ("triton", "cuda")]
    if bad or not backends:
        print(f"error: --backends: got {args.backends!r}; expected triton and/or cuda", file=sys.stderr)
        return 2
    passes = tuple(x.strip() for x in args.passes.split(",") if x.strip())
    if not passes or any(x not in PASSES for x in passes):
        print(f"error: --passes: got {args.passes!r}; expected fwd and/or bwd", file=sys.stderr)
        return 2
    try:
        result = estimate(wl, backends, args.jobs, passes)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render(result))
    if not args.no_write:
        out = args.out or default_output(result["date"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {out}")
    return 0
