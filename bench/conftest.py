"""pytest-benchmark set-up for bench/: record the GPU and software versions in the
JSON's machine_info, so every file in bench/results/ says where it came from."""

from __future__ import annotations

import os
import subprocess


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_sm"] = f"{p.major}.{p.minor}"
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["gpu"] = None
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
    except Exception:
        info["commit"] = os.environ.get("VITKERNELS_COMMIT")
    from vitkernels import cuda

    info["cuda_extension"] = cuda.is_built()
    machine_info["vitkernels"] = info
