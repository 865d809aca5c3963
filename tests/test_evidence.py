"""Automatic dispatch between the cuda and triton backends follows the speed evidence
(vitkernels/evidence.py): a measurement of the GPU's architecture, else the
compiler-based estimate (sm_90 only), else triton first. Evidence files are
fabricated in a temporary folder; CUDA tensors exist only as fakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vitkernels import cuda, evidence
from vitkernels.ops import patch_embed, performer, relpos
from vitkernels.ops._dispatch import select


def _estimate(folder: Path, date: str, times: dict[tuple[str, str, str], float], arch: str = "sm_90a") -> Path:
    """An estimate file: times {(workload, pass, backend): us}."""
    from vitkernels.workloads import WORKLOADS

    calls = [{"workload": w, "op": WORKLOADS[w].op, "pass": p, "backend": b, "dtype": "bf16",
              "launches": 1, "estimate_us": t, "floor_us": 1.0, "ratio": t, "bound": "issue"}
             for (w, p, b), t in times.items()]  # fmt: skip
    path = folder / f"estimate-{arch.replace('_', '')}-{date}.json"
    path.write_text(json.dumps({"kind": "estimate", "arch": arch, "date": date, "calls": calls}))
    return path


def _measurement(folder: Path, name: str, capability: str, times: dict[tuple[str, str, str], float]) -> Path:
    """A pytest-benchmark file as bench/gpu_run.py writes it: times {(workload, pass, impl): us}."""
    benches = [{"name": f"{w} {i}", "extra_info": {"workload": w if p == "fwd" else f"{w} {p}", "impl": i,
                                                   "dtype": "bfloat16", "pass": p, "time_us": t}}
               for (w, p, i), t in times.items()]  # fmt: skip
    path = folder / name
    path.write_text(json.dumps({"machine_info": {"vitkernels": {"gpu": "NVIDIA H200", "capability": capability}},
                                "benchmarks": benches}))  # fmt: skip
    return path


@pytest.fixture
def results(tmp_path, monkeypatch):
    """An empty evidence folder that evidence.py reads (re-read on every test)."""
    monkeypatch.setenv(evidence.RESULTS_ENV, str(tmp_path))
    evidence.clear_cache()
    yield tmp_path
    evidence.clear_cache()


RELPOS_FAST = {("A1", "fwd", "cuda"): 40.0, ("A1", "fwd", "triton"): 80.0,
               ("A3", "fwd", "cuda"): 5.0, ("A3", "fwd", "triton"): 8.0}  # fmt: skip


def test_estimate_decides_both_ways_and_names_the_worst_workload(results):
    _estimate(results, "2026-11-30", {**RELPOS_FAST, ("A3", "fwd", "cuda"): 29.0})
    v = evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd")
    assert not v.take
    assert v.why == f"estimate 29 us vs triton 8.0 us at A3 fwd ({results / 'estimate-sm90a-2026-11-30.json'})"
    _estimate(results, "2026-12-01", RELPOS_FAST)  # a newer estimate: cuda faster everywhere
    evidence.clear_cache()
    v = evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd")
    assert v.take and "estimate at least as fast as triton at every workload (2;" in v.why
    assert "estimate-sm90a-2026-12-01.json" in v.why
    # the estimate has no fwd+bwd rows: no evidence for training calls
    v = evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd+bwd")
    assert not v.take and v.why.startswith("no measurement or estimate of cuda and triton") and "triton first" in v.why


def test_a_measurement_beats_the_estimate_and_only_for_its_architecture(results):
    _estimate(results, "2026-12-01", RELPOS_FAST)
    _measurement(results, "h200-2026-11-20.json", "9.0",
                 {("A1", "fwd", "cuda"): 90.0, ("A1", "fwd", "triton"): 60.0})  # fmt: skip
    v = evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd")
    assert not v.take and v.why.startswith("measured 90 us vs triton 60 us at A1 fwd (") and "h200-" in v.why
    # the other way round: measured faster though estimated slower
    for p in results.iterdir():
        p.unlink()
    _estimate(results, "2026-12-01", {("A1", "fwd", "cuda"): 90.0, ("A1", "fwd", "triton"): 60.0})
    _measurement(results, "h100-2026-11-20.json", "9.0",
                 {("A1", "fwd+bwd", "cuda"): 200.0, ("A1", "fwd+bwd", "triton"): 250.0,
                  ("A1", "fwd", "cuda"): 50.0, ("A1", "fwd", "triton"): 60.0})  # fmt: skip
    evidence.clear_cache()
    assert evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd").take
    assert evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd+bwd").take
    # an sm_80 GPU has neither a measurement nor an estimate here
    v = evidence.verdict("relpos_attention", "cuda", "triton", (8, 0), "fwd")
    assert not v.take and "on sm_80" in v.why
    # a measurement on sm_80 speaks for sm_80 only
    _measurement(results, "a100-2026-11-25.json", "8.0", {("A1", "fwd", "cuda"): 10.0, ("A1", "fwd", "triton"): 20.0})
    evidence.clear_cache()
    assert evidence.verdict("relpos_attention", "cuda", "triton", (8, 0), "fwd").take
    assert evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd").take  # still the h100 file


def test_no_results_folder_means_triton_first(tmp_path, monkeypatch):
    """An installed package has no bench/ beside it: no evidence, and it says so."""
    monkeypatch.delenv(evidence.RESULTS_ENV, raising=False)
    monkeypatch.setattr(evidence, "_CHECKOUT_RESULTS", tmp_path / "no-such-folder")
    evidence.clear_cache()
    try:
        assert evidence.results_dir() is None
        v = evidence.verdict("performer_attention", "cuda", "triton", (9, 0), "fwd")
        assert not v.take and v.why.startswith("no speed evidence") and "triton first" in v.why
    finally:
        evidence.clear_cache()


def test_unreadable_and_foreign_files_are_ignored(results):
    (results / "broken-2026-12-01.json").write_text("{not json")
    (results / "notes.json").write_text(json.dumps([1, 2]))
    _measurement(results, "nogpu-2026-12-01.json", "", {("T1", "fwd", "cuda"): 1.0, ("T1", "fwd", "triton"): 2.0})
    _estimate(results, "2026-12-01", {("T1", "fwd", "cuda"): 1.0, ("T1", "fwd", "triton"): 2.0}, arch="sm_80")
    v = evidence.verdict("performer_attention", "cuda", "triton", (9, 0), "fwd")
    assert not v.take and v.why.startswith("no measurement or estimate")


# ----------------------------------------------------------------------------
# the ops' dispatch


@pytest.fixture
def gpu(monkeypatch):
    """Fake CUDA tensors on an sm_90 device with the CUDA extension 'loaded'."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda, "has_op", lambda name: True)


def _calls(requires_grad: bool = False):
    with FakeTensorMode():

        def t(*shape):
            return torch.empty(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(requires_grad)

        return [
            ("relpos_attention", relpos, (t(1, 2, 16, 16), t(1, 2, 16, 16), t(1, 2, 16, 32), t(2, 16)),
             {"fmap_size": 4}),
            ("performer_attention", performer, (t(1, 8, 16), t(1, 8, 16), t(1, 8, 16), t(4, 16)), {}),
            ("patch_embed", patch_embed, (t(1, 3, 8, 8), t(4, 12)), {"kernel_size": 2}),
        ]  # fmt: skip


def test_dispatch_takes_cuda_only_where_the_evidence_says_so(results, gpu):
    _estimate(results, "2026-12-01", {
        **RELPOS_FAST,
        ("T1", "fwd", "cuda"): 200.0, ("T1", "fwd", "triton"): 100.0,
        ("P1", "fwd", "cuda"): 90.0, ("P1", "fwd", "triton"): 90.0,  # a tie goes to cuda
        ("A1", "fwd+bwd", "cuda"): 400.0, ("A1", "fwd+bwd", "triton"): 300.0,
    })  # fmt: skip
    want = {"relpos_attention": "cuda", "performer_attention": "triton", "patch_embed": "cuda"}
    for op, module, args, kwargs in _calls():
        chosen, verdicts = module.which_backend(*args, **kwargs)
        assert chosen == want[op], verdicts
        reasons = dict(verdicts)["cuda"]
        if want[op] == "triton":
            assert reasons == [f"passed over: estimate 200 us vs triton 100 us at T1 fwd "
                               f"({results / 'estimate-sm90a-2026-12-01.json'})"]  # fmt: skip
            assert select(module.BACKENDS, module._inputs(*args, **kwargs)).name == "triton"
        else:
            assert reasons == []
        # forcing cuda needs no evidence
        assert select(module.BACKENDS, module._inputs(*args, **kwargs), "cuda").name == "cuda"
    # with gradients the fwd+bwd rows decide: relpos goes to triton
    op, module, args, kwargs = _calls(requires_grad=True)[0]
    chosen, verdicts = module.which_backend(*args, **kwargs)
    assert chosen == "triton" and dict(verdicts)["cuda"][0].startswith("passed over: estimate 400 us vs triton 300")
    with torch.no_grad():
        assert module.which_backend(*args, **kwargs)[0] == "cuda"


def test_dispatch_without_evidence_puts_triton_first(results, gpu):
    for op, module, args, kwargs in _calls():
        chosen, verdicts = module.which_backend(*args, **kwargs)
        assert chosen == "triton"
        (reason,) = dict(verdicts)["cuda"]
        assert reason.startswith("passed over: no measurement or estimate of cuda and triton for " + op)


def test_the_evidence_is_a_constant_to_torch_compile(results):
    """Dispatch runs inside compiled graphs: the lookup must not break a fullgraph trace."""
    _estimate(results, "2026-12-01", RELPOS_FAST)

    def f(x):
        why = evidence.passed_over("relpos_attention", "cuda", "triton", 9, 0, "fwd", "bfloat16")
        return x + (1.0 if why else 2.0)

    out = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(3))
    assert out.tolist() == [2.0, 2.0, 2.0]


def test_info_shows_which_and_why(results, capsys):
    from vitkernels.__main__ import info_main

    _estimate(results, "2026-12-01", {**RELPOS_FAST, ("A1", "fwd+bwd", "cuda"): 400.0,
                                      ("A1", "fwd+bwd", "triton"): 300.0})  # fmt: skip
    assert info_main([]) == 0
    out = capsys.readouterr().out
    assert f"speed evidence from {results}" in out
    lines = [ln.split(None, 1) for ln in out.splitlines() if ln.startswith("relpos_attention") and "sm_90" in ln]
    assert [ln[1].split(":")[0:2] for ln in lines] == [["sm_90 fwd", " taken"], ["sm_90 fwd+bwd", " passed over"]]
    assert "estimate 400 us vs triton 300 us at A1 fwd+bwd" in out
