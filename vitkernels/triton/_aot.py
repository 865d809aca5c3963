"""Ahead-of-time compilation of Triton kernels for a GPU we do not have.

``compile_report(kernel, signature, constexprs, arch=90)`` compiles one
specialisation with ``triton.compile`` for ``sm_<arch>`` (sm_90 becomes sm_90a),
runs ptxas on the PTX with ``-v`` and returns the resource usage it reports.
Used by the compile-budget tests (every kernel, sm_80 and sm_90a, no spills)
and by anyone who wants registers and shared memory without a GPU.

Each kernel module lists the specialisations it launches in ``AOT_SPECS``, a
list of ``AotSpec``; ``all_specs()`` gathers them from every module here.
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


def _ptxas() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for cand in (os.environ.get("TRITON_PTXAS_PATH"), bundled, shutil.which("ptxas")):
        if cand and os.path.exists(cand):
            return cand
    raise RuntimeError("no ptxas found: install triton (it bundles one) or the CUDA toolkit")


def compile_report(spec: AotSpec, arch: int = 90) -> PtxasReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
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
        proc = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {spec.name} on {gpu}:\n{log}")
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
