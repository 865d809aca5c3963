"""Every Triton kernel specialisation that the launchers use, compiled ahead of time
for sm_80 and sm_90a without a GPU; ptxas must report no spills.

The specialisations come from each kernel module's AOT_SPECS (vitkernels/triton/).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from vitkernels.triton._aot import all_specs, compile_report  # noqa: E402

SPECS = all_specs()


def test_every_kernel_module_lists_specs():
    import pkgutil

    import vitkernels.triton as pkg

    modules = {i.name for i in pkgutil.iter_modules(pkg.__path__) if not i.name.startswith("_")}
    listed = {s.kernel.__module__.rsplit(".", 1)[-1] for s in SPECS}
    assert modules <= listed, f"kernel modules without AOT_SPECS: {sorted(modules - listed)}"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_no_register_spills(spec, arch, monkeypatch):
    # The interpreter flag must not leak into a real compilation.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rep = compile_report(spec, arch=arch)
    assert rep.spill_stores == 0 and rep.spill_loads == 0, (
        f"{spec.name} on {rep.arch}: {rep.registers} registers, "
        f"{rep.spill_stores} B spill stores, {rep.spill_loads} B spill loads\n{rep.log}"
    )
    assert rep.registers <= 255
