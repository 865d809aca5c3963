"""tests/conftest.py on a GPU machine, simulated: the gpu tests run in the pytest
process (compiled Triton kernels), every other test in one child pytest with CUDA
hidden, where conftest turns the Triton interpreter on, exactly as CI runs them.

The simulation: a plugin makes torch.cuda.is_available() answer True in the
parent only (the child, with CUDA_VISIBLE_DEVICES="", loads no plugin); the test
files record where they ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_GPU = """
import torch

torch.cuda.is_available = lambda: True
"""

TESTS = """
import os

import pytest
import torch


@pytest.mark.gpu
def test_on_the_gpu_host():
    assert torch.cuda.is_available()
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != ""


@pytest.mark.parametrize("n", [1, 2])
def test_without_a_gpu(n):
    assert not torch.cuda.is_available()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert n != int(os.environ.get("FAIL_CASE", "0"))
"""


def _project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tmp_path / "fake_gpu.py").write_text(FAKE_GPU)
    (tmp_path / "test_modes.py").write_text(TESTS)
    return tmp_path


def _start(project: Path, *args: str, fail_case: int = 0) -> subprocess.Popen:
    env = {
        k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
    }
    env.update(PYTHONPATH=str(project), FAIL_CASE=str(fail_case))
    cmd = [sys.executable, "-m", "pytest", "-p", "fake_gpu", "-p", "no:cacheprovider", *args]
    return subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# the simulated runs the tests below read, by test: (pytest arguments, FAIL_CASE). Each
# is a chain of single-threaded pytest processes; those of the selected tests run side
# by side (the suite's pytest waits on them with CI's second core idle)
RUNS = {
    "test_gpu_host_runs_the_rest_in_a_child_with_cuda_hidden": [(("-q",), 0), (("-q", "-m", "gpu"), 0)],
    "test_a_failure_in_the_child_fails_the_run_and_is_shown": [(("-q",), 2)],
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, list[subprocess.CompletedProcess]]:
    """The simulated runs of every selected test in RUNS, started together, each in a
    project of its own; a deselected test starts none."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    started = {
        name: [_start(_project(tmp_path_factory.mktemp("modes")), *args, fail_case=fail) for args, fail in plan]
        for name, plan in RUNS.items()
        if name in selected
    }
    done = {}
    try:
        for name, procs in started.items():
            done[name] = []
            for proc in procs:
                stdout, stderr = proc.communicate(timeout=600)
                done[name].append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in (p for procs in started.values() for p in procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.mark.slow
def test_gpu_host_runs_the_rest_in_a_child_with_cuda_hidden(runs):
    run, only_gpu = runs["test_gpu_host_runs_the_rest_in_a_child_with_cuda_hidden"]
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "2 passed" in out, out  # the gpu test and the child suite
    assert "tests without a GPU (child pytest, CUDA hidden): 2 passed" in out, out

    out = only_gpu.stdout + only_gpu.stderr
    assert only_gpu.returncode == 0 and "1 passed, 2 deselected" in out, out
    assert "child pytest" not in out


@pytest.mark.slow
def test_a_failure_in_the_child_fails_the_run_and_is_shown(runs):
    (run,) = runs["test_a_failure_in_the_child_fails_the_run_and_is_shown"]
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "test_without_a_gpu[2]" in out and "1 failed, 1 passed" in out, out
    assert "CUDA_VISIBLE_DEVICES= python -m pytest" in out, out


SEED_TESTS = """
import os

import pytest


@pytest.mark.parametrize("n", range(6))
def test_records_its_seed(n):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(f"seed-{n}.txt", "w") as f:
        f.write(f"{worker} {os.environ['VITKERNELS_TEST_SEED']}")
"""


def test_xdist_workers_share_the_seed_the_header_prints(tmp_path):
    """Under pytest-xdist (-n 2) every worker imports conftest on its own: each must take
    the run's one seed, the one the header prints for a rerun, not a fresh random one."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tmp_path / "test_seed.py").write_text(SEED_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "VITKERNELS_TEST_SEED"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "load"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "6 passed" in out, out
    header = [ln for ln in out.splitlines() if "VITKERNELS_TEST_SEED=" in ln]
    assert header, out
    printed = header[0].split("VITKERNELS_TEST_SEED=")[1].split(",")[0]
    records = [(tmp_path / f"seed-{n}.txt").read_text().split() for n in range(6)]
    assert {w for w, _ in records} == {"gw0", "gw1"}, records  # both workers ran tests
    assert {s for _, s in records} == {printed}, (printed, records)


def test_loadfile_order_puts_the_long_files_first():
    """conftest orders the files for --dist loadfile: FIRST's in its order, then by test
    count; a file's tests stay together and in order; xdist's own reordering is off."""
    import types

    import conftest

    def items(*nodeids):
        return [types.SimpleNamespace(nodeid=n) for n in nodeids]

    got = items("tests/test_a.py::t1", "tests/test_b.py::t1", "tests/test_b.py::t2",
                "tests/test_compile_budget.py::t1", "tests/test_a.py::t2", "tests/test_b.py::t3",
                "tests/test_head_mixing_grad.py::t1")  # fmt: skip
    conftest._file_order(got)
    assert [i.nodeid for i in got] == [
        "tests/test_head_mixing_grad.py::t1", "tests/test_compile_budget.py::t1",
        "tests/test_b.py::t1", "tests/test_b.py::t2", "tests/test_b.py::t3",
        "tests/test_a.py::t1", "tests/test_a.py::t2",
    ]  # fmt: skip
    config = types.SimpleNamespace(option=types.SimpleNamespace(loadscopereorder=True))
    conftest.pytest_configure(config)
    assert config.option.loadscopereorder is False
    assert all(name.startswith("test_") and (ROOT / "tests" / name).is_file() for name in conftest.FIRST)
