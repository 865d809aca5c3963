"""Ahead-of-time compilation of Triton kernels for a GPU we do not have.

``compile_report(kernel, signature, constexprs, arch=90)`` compiles one
specialisation with ``triton.compile`` for ``sm_<arch>`` (sm_90 becomes sm_90a),
runs ptxas on the PTX with ``-v`` and returns the resource usage it reports.
Used by the compile-budget tests (every kernel, sm_80 and sm_90a, no spills)
and by anyone who wants registers and shared memory without a GPU.

Each kernel module lists the specialisations it launches in ``AOT_SPECS``, a
list of ``AotSpec``; ``all_specs()`` gathers them from every module here.

Alignment: Triton's JIT marks a pointer argument 16-byte aligned
(``tt.divisibility``) when its address is, which lets it vectorise loads and
changes register allocation. Tensors torch allocates are aligned, so specs are
compiled that way by default; ``aligned=False`` compiles the launch with
misaligned views (e.g. a slice one element into a buffer) instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import tempfile
from typing import Any


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One specialisation of one kernel as it is launched."""

    name: str  # readable id, e.g. "relpos_fwd[f16,Dk32,Dv64]"
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]  # arg name -> "*fp16", "i32", "fp32", "constexpr"
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass
class PtxasReport:
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int
    log: str


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_candidates() -> list[str]:
    """ptxas binaries to try, newest PTX support first (triton bundles two)."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cands = [
        os.environ.get("TRITON_PTXAS_PATH"),
        os.path.join(bindir, "ptxas-blackwell"),
        os.path.join(bindir, "ptxas"),
        shutil.which("ptxas"),
    ]
    found = [c for c in cands if c and os.path.exists(c)]
    if not found:
        raise RuntimeError("no ptxas found: install triton (it bundles one) or the CUDA toolkit")
    return found


def alignment_attrs(kernel: Any, signature: dict[str, str]) -> dict[tuple[int], list]:
    """ASTSource attrs marking every pointer argument 16-byte aligned (as Triton's
    JIT does for tensors whose data_ptr is a multiple of 16)."""
    names = list(getattr(kernel, "arg_names", None) or signature)
    return {
        (names.index(name),): [["tt.divisibility", 16]]
        for name, ty in signature.items()
        if ty.startswith("*")
    }


def compile_report(spec: AotSpec, arch: int = 90, aligned: bool = True) -> PtxasReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = spec.kernel
    if not hasattr(kernel, "src"):
        # Under TRITON_INTERPRET=1 @triton.jit gives an InterpretedFunction: compile
        # the Python function it wraps instead.
        from triton.runtime.jit import JITFunction

        kernel = JITFunction(kernel.fn)
    attrs = alignment_attrs(kernel, spec.signature) if aligned else None
    src = ASTSource(fn=kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        logs = []
        for ptxas in _ptxas_candidates():  # the first whose PTX ISA is new enough
            proc = subprocess.run(
                [ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True,
                text=True,
            )
            log = proc.stdout + proc.stderr
            if proc.returncode == 0:
                break
            logs.append(f"{ptxas}:\n{log}")
        else:
            raise RuntimeError(f"ptxas failed for {spec.name} on {gpu}:\n" + "\n".join(logs))
    regs = _RE_REGS.search(log)
    spill = _RE_SPILL.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not read ptxas's report for {spec.name} on {gpu}:\n{log}")
    return PtxasReport(
        arch=gpu,
        registers=int(regs.group(1)),
        stack_frame=int(spill.group(1)),
        spill_stores=int(spill.group(2)),
        spill_loads=int(spill.group(3)),
        shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0),
        log=log,
    )


def all_specs() -> list[AotSpec]:
    """AOT_SPECS of every kernel module in vitkernels.triton."""
    import vitkernels.triton as pkg

    specs: list[AotSpec] = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"vitkernels.triton.{info.name}")
        specs.extend(getattr(mod, "AOT_SPECS", []))
    return specs


def main(argv: list[str] | None = None) -> int:
    """``python -m vitkernels.triton._aot --arch 90 [--unaligned] [--json FILE]``: compile
    every spec (with 16-byte aligned pointers unless --unaligned; report keys
    ``name@sm_90`` and ``name@sm_90/unaligned``).

    Runs with TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions,
    helpers included, with Python ones that cannot be compiled).
    """
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m vitkernels.triton._aot")
    parser.add_argument("--arch", type=int, action="append", help="80, 90 (repeatable)")
    parser.add_argument("--unaligned", action="store_true", help="pointers not 16-byte aligned")
    parser.add_argument("--json", help="write the reports here")
    args = parser.parse_args(argv)
    specs = all_specs()
    results: dict[str, dict[str, object]] = {}
    for arch in args.arch or [80, 90]:
        for i, spec in enumerate(specs, 1):
            key = f"{spec.name}@sm_{arch}" + ("/unaligned" if args.unaligned else "")
            try:
                rep = compile_report(spec, arch, aligned=not args.unaligned)
                results[key] = dataclasses.asdict(rep)
                line = f"{rep.registers} regs, {rep.spill_stores}/{rep.spill_loads} B spilled"
            except Exception as exc:  # reported per spec; the test fails on it
                results[key] = {"error": f"{type(exc).__name__}: {exc}"}
                line = "ERROR"
            print(f"[aot {i}/{len(specs)}] {key}: {line}", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
