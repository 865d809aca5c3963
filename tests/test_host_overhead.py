"""bench/host_overhead.py without a GPU: every layer of each op is timed (Triton's
launch stubbed), the triton rows include the launches alone, and the JSON holds them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_layers_of_every_op_on_cpu(tmp_path, monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = importlib.util.spec_from_file_location("host_overhead", ROOT / "bench" / "host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    from vitkernels.triton import _common

    run, threads = _common.Launch.run, torch.get_num_threads()
    out = tmp_path / "host.json"
    try:
        assert module.main(["--calls", "20", "--json", str(out)]) == 0
    finally:  # the CPU run stubs the launches and takes one thread, for this process
        _common.Launch.run = run
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["op"], r["backend"]) for r in rows} == {
        (op, b) for op in ("relpos_attention", "performer_attention", "patch_embed") for b in ("triton", "torch")
    }
    for r in rows:
        layers = {"validate", "select", "op", "op_grad", "fwd_bwd"}
        if r["backend"] == "triton":
            layers |= {"launcher", "launches", "custom_op"}
        assert set(r["us"]) == layers, r
        assert all(isinstance(v, float) and v > 0 for v in r["us"].values()), r
    text = capsys.readouterr().out
    assert "launches" in text and "Triton kernel launch stubbed" in text


def test_the_workload_sized_row_times_the_no_grad_layers(tmp_path, monkeypatch, capsys):
    """The A1-sized relpos row (on a GPU by default; asked for by name here, at batch 4
    rather than A1's 256: its torch rows compute on this CPU): the no-grad layers only,
    as many as the small rows have without the gradients."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = importlib.util.spec_from_file_location("host_overhead_a1", ROOT / "bench" / "host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    from vitkernels.triton import _common

    assert "relpos_attention A1" in module.WORKLOAD_ROWS
    assert module.A1_BATCH == 256
    monkeypatch.setattr(module, "A1_BATCH", 4)
    run, threads = _common.Launch.run, torch.get_num_threads()
    out = tmp_path / "host.json"
    try:
        assert module.main(["--calls", "4", "--ops", "relpos_attention A1", "--json", str(out)]) == 0
    finally:
        _common.Launch.run = run
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["op"], r["backend"]) for r in rows} == {("relpos_attention A1", "triton"), ("relpos_attention A1", "torch")}
    for r in rows:
        want = {"validate", "select", "op"} | ({"launcher", "launches", "custom_op"} if r["backend"] == "triton" else set())
        assert set(r["us"]) == want and all(v > 0 for v in r["us"].values()), r
