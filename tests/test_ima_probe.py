"""bench/ima_probe.py without a GPU: its variants' own code runs on CPU (the
interpreter), its parsing of a child's output names the step and launch that
faulted, and its records reach gpu_run's report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = _load("ima_probe")
gpu_run = _load("gpu_run")


def test_variant_names_are_unique_and_the_failing_cases_come_first():
    """The relpos gradient case that faulted first, then the performer's failing case
    (with its backward) and the variants that tell its wrong forward apart (E, M,
    dtype, one tile, cuda); torch's orthogonal_, cleared by the second run, last."""
    names = [v.name for v in probe.VARIANTS]
    assert len(names) == len(set(names))
    relpos = probe.VARIANTS[0]
    assert (relpos.kind, relpos.dtype, relpos.shape) == ("relpos", "f16", (8, 6, 7, 7, 1, 32, 64))
    first = probe.VARIANTS[1]
    assert (first.backend, first.dtype, first.w_dtype, first.layout, first.shape, first.backward) == (
        "triton",
        "f16",
        "f32",
        "test",
        (1, 4096, 33, 17),
        True,
    )
    shapes = {v.shape for v in probe.VARIANTS if v.kind == "performer"}
    assert {(1, 4096, 34, 17), (1, 4096, 32, 17), (1, 4096, 33, 16), (1, 4096, 40, 17), (1, 4096, 48, 17)} <= shapes
    assert probe.VARIANTS[-1].kind == "orthogonal"
    assert set(probe.WRONG_ABOVE) == set(probe.DTYPES)


def test_a_wrong_forward_is_its_own_status():
    text = "STEP forward ok\nINFO forward rel err 9.05e-01, finite True\nWRONG forward rel err 9.05e-01 > 1e-02\nDONE\n"
    rec = probe.outcome(text, 0)
    assert rec["status"] == "wrong" and rec["info"] == ["forward rel err 9.05e-01, finite True"]
    assert "error" not in rec
    assert probe.outcome(text.replace("WRONG", "INFO"), 0)["status"] == "ok"


@pytest.mark.parametrize("layout", ["test", "views"])
def test_a_variant_runs_its_steps_on_cpu(layout, capsys):
    pytest.importorskip("vitkernels.triton.performer")
    v = probe.Variant("cpu", backend="triton", dtype="f32", layout=layout, shape=(1, 40, 33, 17),
                      stages=1, target_programs=2)  # fmt: skip
    import vitkernels.triton.performer as tp

    before = tp.launch, tp.launch_config, tp.TARGET_PROGRAMS
    probe.run_variant(v, "cpu")
    assert (tp.launch, tp.launch_config, tp.TARGET_PROGRAMS) == before  # restored
    out = capsys.readouterr().out
    rec = probe.outcome(out + "DONE\n", 0)
    assert rec["status"] == "ok"
    steps = [s.split("[")[0] for s in rec["steps_ok"]]
    assert steps[:4] == [
        "inputs",
        "launch performer_fwd_kv",
        "launch performer_fwd_q",
        "forward",
    ], steps
    assert steps[-1] == "backward" and "launch performer_bwd_kv" in steps[4:]
    err = float(
        next(i for i in rec["info"] if i.startswith("forward rel err")).split()[3].rstrip(",")
    )
    assert err < 1e-5


def test_a_fault_names_the_last_launch_and_step():
    text = "\n".join([
        "STEP inputs ok",
        "LAUNCH performer_fwd_kv[f16,wf32,T4096,E33,M17] grid=(64,)",
        "Traceback (most recent call last):",
        "RuntimeError: CUDA error: an illegal memory access was encountered",
    ])  # fmt: skip
    rec = probe.outcome(text, 1)
    assert rec["status"] == "FAIL" and rec["after_step"] == "inputs"
    assert rec["last_launch"].startswith("performer_fwd_kv[")
    assert "illegal memory access" in rec["error"]
    assert probe.outcome("STEP inputs ok\n", None)["status"] == "cut"


def test_report_lists_probe_faults_and_fails_on_ours_only(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    ours = {
        "kind": "probe",
        "stage": "probe",
        "variant": probe.VARIANTS[0].name,
        "status": "FAIL",
        "after_step": "inputs",
        "last_launch": "performer_fwd_kv[x]",
        "error": "illegal memory access",
    }
    torchs = dict(ours, variant=probe.VARIANTS[-1].name, last_launch=None)
    import json

    (work / "probe.jsonl").write_text(json.dumps(torchs) + "\n")
    assert gpu_run.report(work, tmp_path / "out", tmp_path) == 0  # torch's fault: reported only
    assert "illegal-access probe" in capsys.readouterr().out
    (work / "probe.jsonl").write_text(json.dumps(torchs) + "\n" + json.dumps(ours) + "\n")
    assert gpu_run.report(work, tmp_path / "out", tmp_path) == 1
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "last launch performer_fwd_kv[x]" in summary and "RESULT: FAILED" in summary
    # a wrong forward is listed with its error (the refusal guards users; not a failure here)
    wrong = dict(variant=probe.VARIANTS[1].name, kind="probe", stage="probe", status="wrong",
                 info=["forward rel err 9.05e-01, finite True"])  # fmt: skip
    (work / "probe.jsonl").write_text(json.dumps(torchs) + "\n" + json.dumps(wrong) + "\n")
    assert gpu_run.report(work, tmp_path / "out", tmp_path) == 0
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert f"wrong {probe.VARIANTS[1].name} (forward rel err 9.05e-01, finite True)" in summary


def test_a_relpos_variant_runs_its_steps_on_cpu(capsys):
    """The relpos kind (the gradient test that faulted on the GPU) on CPU tensors in the
    interpreter: each launch named and synchronised, forward and gradients against
    float64, the launcher restored."""
    pytest.importorskip("vitkernels.triton.relpos")
    import vitkernels.triton.relpos as tr

    before = tr.launch
    probe.run_variant(probe.Variant("cpu", kind="relpos", shape=(2, 3, 7, 7, 1, 32, 64)), "cpu")
    assert tr.launch is before
    rec = probe.outcome(capsys.readouterr().out + "DONE\n", 0)
    assert rec["status"] == "ok", rec
    steps = [s.split("[")[0] for s in rec["steps_ok"]]
    assert steps == ["inputs", "launch relpos_fwd", "forward", "launch relpos_dq", "launch relpos_dkdv", "backward"]
    errs = {i.split()[0]: float(i.split()[-1]) for i in rec["info"]}
    assert set(errs) == {"forward", "dq", "dk", "dv", "dtable"} and max(errs.values()) < 2e-3, errs


def test_a_performer_variant_reports_which_kernel_is_wrong(capsys):
    """Each triton performer variant compares the forward's saved statistics (lks,
    vbar: performer_fwd_kv) with float64 and y with float64 from those statistics
    (performer_fwd_q); right in the interpreter, rows padded to 16 included."""
    pytest.importorskip("vitkernels.triton.performer")
    probe.run_variant(probe.Variant("cpu", dtype="f16", layout="pad16", shape=(1, 70, 33, 17), backward=False), "cpu")
    rec = probe.outcome(capsys.readouterr().out + "DONE\n", 0)
    assert rec["status"] == "ok", rec
    stats = next(i for i in rec["info"] if i.startswith("lks rel err"))
    errs = [float(x.split()[-1]) for x in stats.split(";")]
    assert len(errs) == 3 and max(errs) < 2e-3, stats
