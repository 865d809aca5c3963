"""Says which torch build .ci/setup installed; fails unless it is the CPU build of 2.13.0.

On Linux, PyPI's torch wheels are CUDA builds (about 20 nvidia packages); the CPU
build comes from PyTorch's CPU index (TORCH_INDEX_URL, see README.md) or, on CI,
from a wheel on disk.
"""

from __future__ import annotations

import sys

EXPECTED = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def main() -> int:
    import torch

    version, cuda = torch.__version__, torch.version.cuda
    build = "CPU build" if cuda is None else f"CUDA {cuda} build"
    if not version.startswith(EXPECTED):
        print(f"[setup] error: torch {version} ({build}) is installed; expected {EXPECTED}", file=sys.stderr)
        return 1
    if cuda is not None:
        print(
            f"[setup] error: pip installed torch {version}, the {build}: this machine's pip "
            f"reaches PyPI, whose Linux torch wheels are CUDA builds. Uninstall it "
            f"(python -m pip uninstall -y torch) and rerun with PyTorch's CPU index: "
            f"TORCH_INDEX_URL={CPU_INDEX} bash .ci/setup",
            file=sys.stderr,
        )
        return 1
    print(f"[setup] torch {version} ({build})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
