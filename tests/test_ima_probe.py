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
    """The performer's failing case first (with its backward), each changed case beside
    its old tl.trans form (TRANS_LOAD off), the relpos gradient case that faulted and
    its candidate dQ warps; torch's orthogonal_, cleared by the second run, last."""
    names = [v.name for v in probe.VARIANTS]
    assert len(names) == len(set(names))
    first = probe.VARIANTS[0]
    assert (first.backend, first.dtype, first.w_dtype, first.layout, first.shape, first.backward,
            first.trans_loads) == ("triton", "f16", "f32", "test", (1, 4096, 33, 17), True, True)  # fmt: skip
    old = [v for v in probe.VARIANTS if not v.trans_loads]
    assert {v.shape for v in old} == {(1, 4096, 33, 17), (2, 1000, 40, 17), (2, 3136, 64, 32)}
    for v in old:  # each beside the same case with TRANS_LOAD
        assert any(w.trans_loads and w.shape == v.shape and w.layout == v.layout for w in probe.VARIANTS), v.name
    relpos = [v for v in probe.VARIANTS if v.kind == "relpos"]
    assert (relpos[0].dtype, relpos[0].shape, relpos[0].dq_warps) == ("f16", (8, 6, 7, 7, 1, 32, 64), None)
    assert {v.dq_warps for v in relpos if v.shape == (8, 6, 7, 7, 1, 32, 64)} == {None, 4, 16}
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


def test_the_old_form_and_the_dq_warps_are_what_the_child_runs(capsys):
    """trans_loads=False runs the performer's tl.trans form (TRANS_LOAD off even where
    rows are off 16 bytes), dq_warps sets the relpos dQ launch's warps; both restored."""
    pytest.importorskip("vitkernels.triton.performer")
    import vitkernels.triton.performer as tp
    import vitkernels.triton.relpos as tr

    before = tp._TRANS_LOADS, tr._dq_cfg
    probe.run_variant(probe.Variant("cpu", dtype="f16", layout="offset1", shape=(1, 40, 64, 16), backward=False,
                                    trans_loads=False), "cpu")  # fmt: skip
    out = capsys.readouterr().out
    assert "trans_load=False" in out and "trans_load=True" not in out
    assert probe.outcome(out + "DONE\n", 0)["status"] == "ok"
    probe.run_variant(probe.Variant("cpu", dtype="f16", layout="offset1", shape=(1, 40, 64, 16), backward=False), "cpu")
    assert "LAUNCH performer_fwd_kv[f16,wf32,T40,E64,M16] grid=(1,) trans_load=True" in capsys.readouterr().out
    probe.run_variant(probe.Variant("cpu", kind="relpos", shape=(2, 3, 7, 7, 1, 32, 64), dq_warps=4), "cpu")
    out = capsys.readouterr().out
    dq = next(ln for ln in out.splitlines() if ln.startswith("LAUNCH relpos_dq"))
    assert " warps=4 " in dq, dq
    assert probe.outcome(out + "DONE\n", 0)["status"] == "ok"
    assert (tp._TRANS_LOADS, tr._dq_cfg) == before
