"""Every Triton kernel specialisation that the launchers use, compiled ahead of time
for sm_80 and sm_90a without a GPU; ptxas must report no spills.

The specialisations come from each kernel module's AOT_SPECS (vitkernels/triton/).
The compilation runs in subprocesses with TRITON_INTERPRET unset (this test session
may run the interpreter, whose @triton.jit functions cannot be compiled), one per
architecture, side by side. VITKERNELS_AOT_TRITON_PATHS (colon-separated folders
holding another triton, e.g. `pip install --target DIR triton==3.6.0`) adds those
versions: the GPU machine runs a different triton than CI, and register allocation
differs between them (.ci/run checks triton 3.6 this way, for sm_90a only: the GPU
machines are Hoppers; with 3.6 the relpos backward still spills a little on sm_80).
Pointers are compiled 16-byte aligned, as Triton specialises launches on tensors
torch allocated; the misaligned specialisation is checked for sm_90a too.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from vitkernels.triton._aot import all_specs  # noqa: E402

SPECS = all_specs()
TRITONS = ["installed"] + [
    p for p in os.environ.get("VITKERNELS_AOT_TRITON_PATHS", "").split(":") if p
]
# (triton, arch, variant): every spec as it launches on tensors torch allocated
# (16-byte aligned pointers) for both archs, and with misaligned views for sm_90a;
# another triton for sm_90a aligned only
VARIANTS = [("installed", 80, ""), ("installed", 90, ""), ("installed", 90, "/unaligned")] + [
    (tri, 90, "") for tri in TRITONS[1:]
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{(triton, f"{spec}@sm_{arch}{variant}"): report}, one subprocess per variant."""
    tmp = tmp_path_factory.mktemp("aot")
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = []
    for i, (tri, arch, variant) in enumerate(VARIANTS):
        env = dict(base)
        if tri != "installed":
            env["PYTHONPATH"] = os.pathsep.join([tri, env.get("PYTHONPATH", "")])
            env["TRITON_CACHE_DIR"] = str(tmp / f"cache{i}")
        out = tmp / f"v{i}.json"
        cmd = [sys.executable, "-m", "vitkernels.triton._aot", "--arch", str(arch), "--json", str(out)]
        if variant:
            cmd.append("--unaligned")
        procs.append((tri, arch, subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True), out))
    merged = {}
    for tri, arch, proc, out in procs:
        _, err = proc.communicate(timeout=1500)
        assert proc.returncode == 0, f"AOT compile ({tri}) for sm_{arch} failed:\n{err[-4000:]}"
        merged.update({(tri, k): v for k, v in json.loads(out.read_text()).items()})
    return merged


def test_every_kernel_module_lists_specs():
    import vitkernels.triton as pkg

    modules = {i.name for i in pkgutil.iter_modules(pkg.__path__) if not i.name.startswith("_")}
    listed = {getattr(s.kernel, "__module__", "").rsplit(".", 1)[-1] for s in SPECS}
    listed |= {getattr(getattr(s.kernel, "fn", None), "__module__", "").rsplit(".", 1)[-1] for s in SPECS}
    assert modules <= listed, f"kernel modules without AOT_SPECS: {sorted(modules - listed)}"


CHECKS = [(spec, arch, tri, variant) for tri, arch, variant in VARIANTS for spec in SPECS]


@pytest.mark.parametrize(
    "spec, arch, triton_path, variant",
    CHECKS,
    ids=[f"{s.name}-sm{a}{v}" + ("" if t == "installed" else f"-{t}") for s, a, t, v in CHECKS],
)
def test_no_register_spills(reports, spec, arch, triton_path, variant):
    rep = reports[(triton_path, f"{spec.name}@sm_{arch}{variant}")]
    where = f"{spec.name} on sm_{arch}{variant} ({triton_path})"
    assert "error" not in rep, f"{where}: {rep.get('error')}"
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, (
        f"{where}: {rep['registers']} registers, {rep['spill_stores']} B spill stores, "
        f"{rep['spill_loads']} B spill loads\n{rep['log']}"
    )
    assert rep["registers"] <= 255


def test_spec_names_are_unique():
    names = [s.name for s in SPECS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
