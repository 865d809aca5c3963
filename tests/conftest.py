"""Test set-up shared by every test.

* Without CUDA, the Triton kernels run in the interpreter on CPU tensors:
  TRITON_INTERPRET=1 is set before triton is imported.
* vit-pytorch and timm import torchvision, whose PyPI wheel is a CUDA build
  with compiled ops that a CPU torch cannot load; defining the two op schemas
  its Python code registers fakes for lets `import torchvision` succeed.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

from vitkernels.compare import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


# Fresh random inputs on every run, reproducible from the seed in the header:
# VITKERNELS_TEST_SEED=<seed> pytest ... repeats a failing run exactly.
SEED = int(os.environ.get("VITKERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"vitkernels: VITKERNELS_TEST_SEED={SEED}, TRITON_INTERPRET={interp}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # the header is hidden under -q: say the seed again where a failure is read
    if exitstatus not in (0, 5):
        terminalreporter.write_line(f"rerun with VITKERNELS_TEST_SEED={SEED} to repeat these inputs")


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))
    yield
