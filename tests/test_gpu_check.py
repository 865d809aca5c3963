"""bench/gpu_check.sh and bench/gpu_run.py without a GPU.

* ``--dry-run`` walks the whole plan on this CPU: the torch backend really runs
  against float64 at tiny sizes, everything that needs a GPU is reported as
  skipped, no time is written, and the files fit what the device tool brings back.
* A deadline with no time left cuts every stage and still prints the summary.
* The report turns stage records into the results JSON that bench/make_results.py
  reads, and puts each measured op beside its compiler-based estimate.
* The counting reproduces WORKLOADS.md's table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_run = _load("gpu_run")
make_results = _load("make_results")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    return env


def _check(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
        cwd=ROOT,
    )


# the dry-run walks of gpu_check.sh the tests below read, by test: each is a chain of
# single-threaded processes, so the walks of the selected tests run side by side
# (the suite's pytest keeps one core busy; CI has two)
WALKS = {
    "test_dry_run_walks_the_plan_on_cpu": ("--dry-run",),
    "test_no_time_left_cuts_every_stage_and_still_reports": ("--dry-run", "--minutes", "0"),
    "test_quick_runs_env_correctness_the_probe_and_the_five_op_workloads_only": ("--dry-run", "--quick"),
}


@pytest.fixture(scope="module")
def walks(request, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """(out folder, finished run) of the walk of every selected test in WALKS, started
    together (a deselected test, e.g. the slow dry run under -m "not slow", starts none)."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    started = {}
    for name, args in WALKS.items():
        if name in selected:
            out = tmp_path_factory.mktemp("gpu-check") / "out"
            cmd = ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(out), *args]
            started[name] = (out, cmd, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT))  # fmt: skip
    done = {}
    try:
        for name, (out, cmd, proc) in started.items():
            stdout, stderr = proc.communicate(timeout=600)
            done[name] = (out, subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    finally:
        for _, _, proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def _records(out: Path) -> list[dict]:
    return json.loads((out / "check.json").read_text())["records"]


@pytest.mark.slow
def test_dry_run_walks_the_plan_on_cpu(walks):
    out, run = walks["test_dry_run_walks_the_plan_on_cpu"]
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert run.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is last
    assert "RESULT: ok" in summary and "gpu_check summary" in summary

    stages = [r["name"] for r in _records(out) if r["kind"] == "stage"]
    order = ["env", "correctness", "probe", "ops", "models", "tests", "ops-rest", "models-rest"]
    assert [s for s in stages if s in order] == order, stages
    records = _records(out)
    # what runs on a CPU ran and passed: the torch backend against float64
    ran = [r for r in records if r["kind"] == "check" and r["status"] == "pass"]
    assert {(r["op"], r["pass"]) for r in ran} == {
        (op, p)
        for op in ("relpos_attention", "performer_attention", "patch_embed", "head_mixing_attention")
        for p in ("fwd", "bwd")
    }
    assert all(r["backend"] == "torch" and r["dtype"] == "float32" for r in ran)
    # within the float32 tolerance, not a fixed 1e-6: how far float32 lands from float64
    # depends on the inputs' conditioning (re-attention's LayerNorm across 4 heads reached
    # 9e-6 in its gradients over 3000 seeds; most cases stay under 1e-6)
    # (the float32 tolerance without TF32, 1e-4: the records' own tol allows for TF32)
    assert all(0 <= r["rel_err"] <= min(r["tol"], gpu_run.TOL["float32"]) for r in ran), [
        (r["case"], r["pass"], r["rel_err"], r["tol"]) for r in ran
    ]
    # the timm talking heads' pre-mix bias: its exact gradient is 0, measured against the
    # terms it sums (not the float64 reference's 1e-17 rounding: every backend failed so)
    assert {r["case"] for r in ran} >= {"M1-timm biases"}
    # the kernels and the half dtypes are on the plan, reported as needing a GPU
    checks = [r for r in records if r["kind"] == "check"]
    # an op without a cuda backend is n/a there, not a failed refusal (the GPU run of
    # 2026-12-04 counted head_mixing_attention's "cuda" as 8 failures)
    no_cuda = [r for r in checks if r["op"] == "head_mixing_attention" and r["backend"] == "cuda"]
    assert no_cuda and all(r["status"] == "n/a" and "has no cuda backend" in r["reason"] for r in no_cuda)
    assert all(r["backend"] != "cuda" or r["status"] == "skipped" for r in checks if r not in no_cuda)
    # the gpu tests' stage walks its plumbing (bench/gpu_tests.sh): the first file collected
    log = (out / "pytest-gpu.log").read_text()
    assert log.startswith("##### tests/test_relpos_gpu.py\n") and " collected in " in log, log[-2000:]
    assert re.search(r"gpu tests: \d+ collected in 1 file\(s\)", summary), summary
    skipped = {(r["backend"], r["dtype"]) for r in checks if r["status"] == "skipped"}
    assert {("triton", "bfloat16"), ("cuda", "float16"), ("torch", "bfloat16")} <= skipped
    bench = [r for r in records if r["kind"] == "bench"]
    assert {r["base_workload"] for r in bench} == set(gpu_run.DEFAULT_OPS + gpu_run.REST_OPS)
    assert {r["impl"] for r in bench} >= {"eager", "torch", "triton", "cuda", "compiled", "flex"}
    results = [r for r in records if r["kind"] in ("check", "bench", "model")]
    assert not [r for r in results if r["status"] in ("ok", "FAIL", "error")]
    assert not [r for r in records if "time_us" in r]
    assert [r for r in bench if r["impl"] == "eager" and "check_err" in r]  # peers ran once
    # the results file: make_results reads it, and it holds no measured row
    (results,) = out.glob("cpu-dry-run-*.json")
    assert make_results.load_run(results).rows == []
    # what the device tool brings back: at most 8 files, flat, plain names
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == out for p in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files


def test_no_time_left_cuts_every_stage_and_still_reports(walks):
    out, run = walks["test_no_time_left_cuts_every_stage_and_still_reports"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stages = {r["name"]: r["status"] for r in _records(out) if r["kind"] == "stage"}
    for name in ("env", "correctness", "probe", "ops", "models", "tests", "ops-rest", "models-rest"):
        assert stages[name] == "cut", stages
    assert "gpu_check summary" in run.stdout and "env cut" in run.stdout


def test_quick_runs_env_correctness_the_probe_and_the_five_op_workloads_only(walks):
    out, run = walks["test_quick_runs_env_correctness_the_probe_and_the_five_op_workloads_only"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = _records(out)
    stages = {r["name"]: (r["status"], r.get("note", "")) for r in records if r["kind"] == "stage"}
    assert stages["models"] == ("skipped", "--quick") and stages["tests"] == ("skipped", "--quick")
    assert "ops-rest" not in stages and "models-rest" not in stages
    assert [r for r in records if r["kind"] == "check" and r["status"] == "pass"]
    bench = {r["base_workload"] for r in records if r["kind"] == "bench"}
    assert bench == {"A1", "A4", "T1", "P1", "M1"}, bench
    assert stages["probe"][0] == "ok"
    probes = [r for r in records if r["kind"] == "probe"]
    assert probes and all(r["status"] == "skipped" for r in probes)
    assert "illegal-access probe" in run.stdout
    assert "RESULT: ok" in run.stdout


def test_bad_arguments_say_what_was_expected(tmp_path):
    run = _check(tmp_path, "--minutes", "soon")
    assert run.returncode == 2 and "--minutes takes a number of minutes, got 'soon'" in run.stderr
    run = _check(tmp_path, "--frobnicate")
    assert run.returncode == 2 and "unknown argument '--frobnicate'" in run.stderr


def test_counting_reproduces_the_workloads_table():
    # WORKLOADS.md: MB moved and the H200 floor (us) of the forward pass at batch 256
    table = {"A1": (77, 18), "A4": (161, 37), "T1": (411, 96), "P1": (156, 75)}
    for wid, (mb, floor_us) in table.items():
        flops, nbytes = gpu_run.counts(wid, 256)["fwd"]
        assert abs(nbytes / 1e6 - mb) <= 0.01 * mb, (wid, nbytes)
        floor = max(nbytes / gpu_run.NOMINAL_COPY, flops / gpu_run.NOMINAL_MATMUL) * 1e6
        assert abs(floor - floor_us) <= 1.0, (wid, floor)
        f2, b2 = gpu_run.counts(wid, 256)["fwd+bwd"]
        assert f2 > flops and b2 > nbytes


def _estimate_file(folder: Path, date: str, calls: list[dict]) -> None:
    (folder / f"estimate-sm90a-{date}.json").write_text(json.dumps({"calls": calls}))


def test_estimates_come_from_the_newest_file_and_sum_fwd_and_bwd(tmp_path):
    call = {"workload": "A1", "op": "relpos_attention", "backend": "triton", "dtype": "bf16"}
    _estimate_file(tmp_path, "2026-11-01", [{**call, "pass": "fwd", "estimate_us": 99.0}])
    _estimate_file(
        tmp_path,
        "2026-11-30",
        [
            {**call, "pass": "fwd", "estimate_us": 30.0},
            {**call, "pass": "bwd", "estimate_us": 70.0},
        ],
    )
    path, table = gpu_run.newest_estimates(tmp_path)
    assert path.name == "estimate-sm90a-2026-11-30.json"
    assert gpu_run.estimate_for(table, "A1", "fwd", "triton", "bfloat16") == 30.0
    assert gpu_run.estimate_for(table, "A1", "fwd+bwd", "triton", "bfloat16") == 100.0
    assert gpu_run.estimate_for(table, "A1", "fwd", "cuda", "bfloat16") is None
    assert gpu_run.newest_estimates(tmp_path / "none") == (None, {})


def test_report_gives_make_results_json_and_a_summary_with_estimates(tmp_path, capsys):
    """Synthetic stage records (not measurements) through the report."""
    work, out, est = tmp_path / "work", tmp_path / "out", tmp_path / "est"
    work.mkdir()
    est.mkdir()
    _estimate_file(est, "2026-11-30", [{"workload": "A1", "op": "relpos_attention", "pass": "fwd",
                                        "backend": "triton", "dtype": "bf16", "estimate_us": 21.5}])  # fmt: skip
    flops, nbytes = gpu_run.counts("A1", 256)["fwd"]
    env = {"kind": "env", "gpu": "NVIDIA H200", "capability": "9.0", "sms": 132, "torch": "2.11.0",
           "triton": "3.6.0", "cuda": "13.0", "commit": "abc", "tree": "t"}  # fmt: skip
    bench = {"kind": "bench", "workload": "A1", "base_workload": "A1", "pass": "fwd",
             "dtype": "bfloat16", "batch": 256, "flops": flops, "bytes": nbytes, "status": "ok",
             "min_us": 1.0, "reps": 10}  # fmt: skip
    lines = [
        env,
        {"kind": "ceiling", "name": "copy", "value": 4.0e12},
        {**bench, "impl": "eager", "time_us": 100.0},
        {**bench, "impl": "triton", "time_us": 25.0, "host_us": 30.0, "kernel_us": 20.0, "graph_us": 22.0},
        {**bench, "impl": "torch", "time_us": 50.0, "graph_error": "RuntimeError: capture failed"},
        {
            "kind": "check",
            "op": "relpos_attention",
            "case": "A1",
            "backend": "triton",
            "dtype": "bfloat16",
            "pass": "bwd",
            "status": "FAIL",
            "rel_err": 0.5,
            "tol": 0.05,
            "nonfinite": 0,
        },  # fmt: skip
    ]
    (work / "x.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{cut sho")
    assert gpu_run.report(work, out, est) == 1  # the failed check fails the run
    text = capsys.readouterr().out
    assert "RESULT: FAILED" in text and "FAIL  relpos_attention A1 triton bfloat16 bwd" in text
    header = next(ln for ln in text.splitlines() if ln.startswith("workload"))
    assert header.split()[2:10] == ["event", "us", "host", "us", "kernel", "us", "estimate", "us"]
    row = next(ln for ln in text.splitlines() if ln.startswith("A1") and "triton" in ln)
    # event time (host-bound: starred), host, kernel time, the estimate beside it, graph replay
    assert row.split()[2:7] == ["25.0*", "30.0", "20.0", "21.5", "22.0"] and "4.00x" in row  # vs eager
    assert "graph us '-': torch: RuntimeError: capture failed" in text
    (results,) = out.glob("h200-*.json")
    run = make_results.load_run(results)
    assert run.header["gpu"] == "NVIDIA H200" and run.header["commit"] == "abc"
    triton = next(r for r in run.rows if r["impl"] == "triton")
    assert triton["vs_eager"] == pytest.approx(4.0)
    assert triton["fraction_of_floor"] == pytest.approx(nbytes / 4.0e12 / 25e-6)
    assert "estimate_us" not in triton  # measurements and estimates are kept apart


def test_slug_names_the_gpu():
    assert gpu_run.slug("NVIDIA H200") == "h200"
    assert gpu_run.slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    assert gpu_run.slug(None) == "cpu-dry-run"


def test_pytest_outcome_sums_the_per_file_runs(tmp_path):
    """gpu_check.sh runs each gpu test file in its own pytest: the outcome sums them and
    names the failing and crashed files (a synthetic log, not a run)."""
    log = tmp_path / "pytest-gpu.log"
    log.write_text(
        "##### tests/test_relpos_gpu.py\nPASSED\n===== 1 failed, 40 passed in 12.1s =====\n"
        "##### tests/test_performer_gpu.py\nFatal Python error: Segmentation fault\n"
        "##### tests/test_cli.py\n===== 3 passed, 2 deselected in 2.0s =====\n"
        "##### tests/test_optimize.py\n===== 1 error, 5 passed in 3.0s =====\n"
    )
    text = gpu_run.pytest_outcome(log)
    assert text.startswith("1 failed, 1 error, 48 passed, 2 deselected in 3 file(s)")
    assert "failing: tests/test_relpos_gpu.py (1 failed), tests/test_optimize.py (1 error)" in text
    assert "1 file(s) without a summary line (crashed or stopped): tests/test_performer_gpu.py" in text
    log.write_text("##### tests/test_cli.py\n===== 3 passed in 2.0s =====\n")
    assert gpu_run.pytest_outcome(log) == "3 passed in 1 file(s)"


def _fake_python(tmp_path: Path) -> Path:
    """A stand-in for python -m pytest: passes a file named *pass*, fails *fail*, finds no
    gpu test in *none* (pytest's exit 5), and records its arguments."""
    fake = tmp_path / "fakepy"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "args: $*" >>"$(dirname "$0")/calls"\n'
        'f=${!#}\n'
        'case $f in *fail*) echo "= 1 failed, 2 passed in 0.1s ="; exit 1 ;;\n'
        '  *none*) echo "= 3 deselected in 0.1s ="; exit 5 ;;\n'
        '  *) echo "= 4 passed in 0.1s ="; exit 0 ;; esac\n'
    )
    fake.chmod(0o755)
    return fake


def test_gpu_tests_runs_one_pytest_per_file_and_leaves_the_files_alone(tmp_path):
    """bench/gpu_tests.sh, gpu_check.sh's tests stage. Its inline predecessor took the
    python as bash -c's $0, so on the GPU (2026-12-04) it emptied the first test file,
    ran the log as a program, and reported 'tests failed 0s'."""
    fake = _fake_python(tmp_path)
    files = []
    for name in ("test_a_pass.py", "test_b_none.py", "test_c_fail.py"):
        f = tmp_path / name
        f.write_text("# a test file\n")
        files.append(str(f))
    log = tmp_path / "pytest-gpu.log"
    script = str(ROOT / "bench" / "gpu_tests.sh")
    run = subprocess.run(["bash", script, str(fake), str(log), *files], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr  # one file failed
    assert all(Path(f).read_text() == "# a test file\n" for f in files)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 3 and all(c.startswith("args: -m pytest -m gpu ") for c in calls), calls
    assert [c.split()[-1] for c in calls] == files
    assert run.stdout.splitlines() == [f"{files[0]}: = 4 passed in 0.1s =", f"{files[1]}: = 3 deselected in 0.1s =",
                                       f"{files[2]}: = 1 failed, 2 passed in 0.1s ="]  # fmt: skip
    text = gpu_run.pytest_outcome(log)
    assert text.startswith("1 failed, 6 passed, 3 deselected in 3 file(s)"), text
    # passing and empty files only: exit 0
    run = subprocess.run(["bash", script, str(fake), str(log), *files[:2]], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    # arguments in the wrong order are refused before anything is written
    for args in ([str(log), str(fake), *files], [str(fake), files[0], files[1]], [str(fake)]):
        run = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and "gpu_tests.sh:" in run.stderr, (args, run.stderr)
    assert all(Path(f).read_text() == "# a test file\n" for f in files)


def test_a_zero_gradient_is_measured_against_the_terms_it_sums():
    """The pre-mix bias's exact gradient is 0: the float64 reference gives ~1e-17, the
    torch backend the rounding of its sum, the triton kernels exact zeros. On the GPU
    (2026-12-04) both backends failed against the reference's own norm (6e12 and 1.0).
    Against the norm of sum |dl| both pass, and a gradient of that size still fails."""
    torch = pytest.importorskip("torch")
    (case,) = [c for c in gpu_run.correctness_cases(True) if c.name == "M1-timm biases"]
    leaves, _ = case.make(torch.float64, "cpu")
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    with gpu_run.softmax_input_grads() as logit_grads:
        want = case.call(leaves, "reference")
    grads = dict(zip(leaves, torch.autograd.grad(want, list(leaves.values()), torch.randn_like(want)), strict=True))
    floors = gpu_run.zero_gradient_floors(case, logit_grads.grads)
    assert set(floors) == {"pre_b"} and floors["pre_b"] > 1.0
    ref = grads["pre_b"]
    assert ref.norm().item() < 1e-12 * floors["pre_b"]  # 0 up to float64 rounding
    for got in (torch.zeros_like(ref), ref + 1e-7 * floors["pre_b"] * torch.randn_like(ref)):
        assert gpu_run.rel_error(got, ref)[0] >= 0.99  # without the floor: "wrong"
        assert gpu_run.rel_error(got, ref, floors["pre_b"])[0] < 1e-6
    wrong = ref + floors["pre_b"] * torch.randn_like(ref) / 2
    assert gpu_run.rel_error(wrong, ref, floors["pre_b"])[0] > gpu_run.GRAD_TOL["bfloat16"]
    # the other ops' cases and leaves have no floor
    assert all(not gpu_run.zero_gradient_floors(c, []) for c in gpu_run.correctness_cases(True))


def test_float32_tolerance_follows_the_tf32_switches_in_force(monkeypatch):
    """The torch backend's float32 runs through cuDNN/cuBLAS, which use TF32 where torch's
    switches allow it (cuDNN's is on by default: the GPU run's patch_embed weight
    gradient, 2.9e-4 against 2e-4); the kernels set their own precision."""
    import torch

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fwd, grad, why = gpu_run.tolerances("torch", "float32")
    assert (fwd, grad) == (gpu_run.TF32_TOL, gpu_run.TF32_GRAD_TOL) and "cudnn.allow_tf32" in why
    assert 2.9e-4 <= grad < gpu_run.GRAD_TOL["float16"]
    for backend in ("triton", "cuda", "reference"):
        assert gpu_run.tolerances(backend, "float32") == (1e-4, 2e-4, None)
    assert gpu_run.tolerances("torch", "bfloat16") == (2e-2, 5e-2, None)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert gpu_run.tolerances("torch", "float32") == (1e-4, 2e-4, None)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert "cuda.matmul.allow_tf32" in gpu_run.tolerances("torch", "float32")[2]


def test_gpu_tests_rerun_a_file_without_the_tests_that_ran_before_a_cuda_fault(tmp_path):
    """A CUDA fault loses the rest of its process; tests/conftest.py stops the session
    after the faulting test ("CUDA fault in ..."), and bench/gpu_tests.sh runs the file
    again without the tests that ran, so every later test still runs (the 2026-12-04
    run lost 170 tests of one file to one fault). A stand-in file: its second test
    "faults" the way the hook reports it, the second run must not repeat the first two."""
    f = tmp_path / "test_fault.py"
    f.write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.gpu\n"
        "def test_one():\n    pass\n"
        "@pytest.mark.parametrize('x', ['a b', 'c'])\n"
        "def test_two(request, x):\n"
        "    if x == 'a b':\n"
        "        request.session.shouldfail = 'CUDA fault in ' + request.node.nodeid\n"
        "        raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
        "def test_three():\n    pass\n"
    )
    log = tmp_path / "pytest-gpu.log"
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_tests.sh"), sys.executable, str(log), str(f)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    text = log.read_text()
    assert text.count(f"##### {f}") == 2 and "(rerun after a CUDA fault: without the 2 tests that ran)" in text, text
    second = text.split("(rerun after a CUDA fault")[1]
    assert "test_one PASSED" not in second and "test_two[c] PASSED" in second and "test_three PASSED" in second
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and "1 failed, 1 passed" in lines[0] and "2 passed, 2 deselected" in lines[1], lines
    assert gpu_run.pytest_outcome(log).startswith("1 failed, 3 passed in 1 file(s)"), gpu_run.pytest_outcome(log)


def test_a_cuda_fault_is_told_from_other_errors():
    import conftest

    assert conftest.cuda_fault("CUDA error: an illegal memory access was encountered")
    assert conftest.cuda_fault("Triton Error [CUDA]: an illegal memory access was encountered")
    assert not conftest.cuda_fault("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not conftest.cuda_fault("AssertionError: rel err 0.9")
