"""Test set-up shared by every test.

* Without CUDA, the Triton kernels run in the interpreter on CPU tensors:
  TRITON_INTERPRET=1 is set before triton is imported, and the tests marked
  ``gpu`` are skipped. This is how CI runs.
* With CUDA (a GPU machine), the Triton kernels are compiled, and one process
  cannot also interpret them (triton decides at import). The ``gpu`` tests run
  in this process; every other test runs in one child pytest that hides the GPU
  (CUDA_VISIBLE_DEVICES=""), i.e. exactly as CI runs it, shown as the single
  test ``tests without a GPU``. ``-m gpu`` runs only the former;
  ``CUDA_VISIBLE_DEVICES= python -m pytest`` only the latter. With
  TRITON_INTERPRET=1 set by hand on a GPU machine everything runs here under the
  interpreter and the ``gpu`` tests are skipped (they need compiled kernels).
* vit-pytorch and timm import torchvision, whose PyPI wheel is a CUDA build
  with compiled ops that a CPU torch cannot load; defining the two op schemas
  its Python code registers fakes for lets `import torchvision` succeed.
* Triton before 3.7 (the GPU machine has 3.6) interprets a loop bound such as
  ``range(0, NK, BLOCK)`` with ``int()`` of a one-element 1-d array, which numpy
  2.4 and later refuse; under the interpreter that one conversion is made as
  newer Triton makes it (``int(a.squeeze())``), so the child suite passes there too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

from vitkernels.compare import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()


def _interpreter_index_for_new_numpy() -> None:
    import numpy as np

    try:
        int(np.zeros(1))
        return  # this numpy still converts one-element arrays
    except TypeError:
        pass
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "vitkernels_shim", False):
        return

    def patched(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.vitkernels_shim = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _interpreter_index_for_new_numpy()

import pytest  # noqa: E402

# Fresh random inputs on every run, reproducible from the seed in the header:
# VITKERNELS_TEST_SEED=<seed> pytest ... repeats a failing run exactly.
SEED = int(os.environ.get("VITKERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
# pytest-xdist's workers (-n) import this file again and inherit the environment: one
# seed for the whole run, the one the header and the failure summary print
os.environ["VITKERNELS_TEST_SEED"] = str(SEED)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # the workers share the cores: torch's own threads would oversubscribe them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
CPU_SUITE = "tests without a GPU"
CPU_OUTCOME = pytest.StashKey[str]()


class ChildFailed(Exception):
    """The child pytest of the tests without a GPU failed; the message is its output's end."""


class CpuSuite(pytest.Item):
    """Runs the given non-gpu tests in a child pytest with CUDA hidden, as CI runs them
    (Triton interpreter on CPU tensors); passes when the child passes."""

    def __init__(self, *, nodeids: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.nodeids = nodeids

    def runtest(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(CUDA_VISIBLE_DEVICES="", VITKERNELS_TEST_SEED=str(SEED))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
        proc = subprocess.run(
            [*cmd, *self.nodeids],
            cwd=self.config.rootpath,
            env=env,
            capture_output=True,
            text=True,
        )
        output = proc.stdout + proc.stderr
        summary = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
        outcome = summary[-1].strip("= ") if summary else f"exit status {proc.returncode}"
        self.config.stash[CPU_OUTCOME] = outcome
        if proc.returncode not in (0, 5):  # 5: every test deselected
            raise ChildFailed(output[-20000:])

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ChildFailed):
            return (
                f"{len(self.nodeids)} tests ran in a child pytest with CUDA_VISIBLE_DEVICES='' "
                f"(rerun them alone: CUDA_VISIBLE_DEVICES= python -m pytest ...); its output ends:"
                f"\n{excinfo.value}"
            )
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{CPU_SUITE} ({len(self.nodeids)} tests in a child pytest)"


# Files whose time is mostly a fixed cost in few tests (ahead-of-time compiles, a g++
# build, child processes) or that are simply the longest, measured on 2 cores
# (bench/NOTES.md, 2026-12-04): --dist loadfile hands them out first. xdist's own order
# (most tests first) started the compile-budget and gpu_check files last, and the
# suite's last minutes ran one worker alone.
FIRST = (
    "test_head_mixing_grad.py", "test_compile_budget.py", "test_gpu_check.py", "test_cuda_compile.py",
    "test_head_mixing.py", "test_optimize.py", "test_head_mixing_many.py", "test_conftest_modes.py",
    "test_relpos.py", "test_patch_embed.py", "test_compare.py",
)  # fmt: skip


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order made below
        config.option.loadscopereorder = False


def _file_order(items: list) -> None:
    """Files in FIRST's order, then by test count (xdist's rule); each file's tests
    stay together and in their order."""
    counts: dict[str, int] = {}
    for item in items:
        f = item.nodeid.split("::")[0]
        counts[f] = counts.get(f, 0) + 1

    def key(item) -> tuple:
        f = item.nodeid.split("::")[0]
        name = f.rsplit("/", 1)[-1]
        return (FIRST.index(name) if name in FIRST else len(FIRST), -counts[f], f)

    items.sort(key=key)


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected what they deselect
def pytest_collection_modifyitems(session, config, items):
    if not GPU or INTERPRET:
        _file_order(items)
        reason = (
            "needs a CUDA GPU (marker gpu)"
            if not GPU
            else "TRITON_INTERPRET=1 runs the Triton kernels in the interpreter; the gpu tests "
            "need them compiled (unset it)"
        )
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
        return
    cpu = [item for item in items if item.get_closest_marker("gpu") is None]
    if not cpu:
        return
    items[:] = [item for item in items if item.get_closest_marker("gpu") is not None]
    suite = CpuSuite.from_parent(session, name=CPU_SUITE, nodeids=[i.nodeid for i in cpu])
    items.insert(0, suite)


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    mode = ""
    if GPU and not INTERPRET:
        mode = "; a GPU is visible: the tests without the gpu marker run in a child pytest with CUDA hidden"
    return f"vitkernels: VITKERNELS_TEST_SEED={SEED}, TRITON_INTERPRET={interp}{mode}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    outcome = config.stash.get(CPU_OUTCOME, None)
    if outcome:
        terminalreporter.write_line(f"{CPU_SUITE} (child pytest, CUDA hidden): {outcome}")
    # the header is hidden under -q: say the seed again where a failure is read
    if exitstatus not in (0, 5):
        terminalreporter.write_line(
            f"rerun with VITKERNELS_TEST_SEED={SEED} to repeat these inputs"
        )


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))
    yield


# A CUDA fault (an illegal memory access) poisons this process's CUDA context: every
# later test would error on it. The session stops after the faulting test instead,
# naming it, and bench/gpu_tests.sh reruns the file without the tests that ran.
CUDA_FAULT = "CUDA fault in "
_FAULT_TEXT = ("illegal memory access", "unspecified launch failure", "misaligned address",
               "illegal instruction")  # fmt: skip


def cuda_fault(text: str) -> bool:
    """Whether an exception's text is a CUDA fault that poisons the context."""
    return any(t in text for t in _FAULT_TEXT)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if GPU and call.excinfo is not None and cuda_fault(str(call.excinfo.value)):
        item.session.shouldfail = f"{CUDA_FAULT}{item.nodeid} ({report.when}): the process's CUDA context is lost"
