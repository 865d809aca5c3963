"""Builds the optional CUDA extension ``vitkernels._C`` from csrc/.

Everything else (metadata, packages) is in pyproject.toml. Without
VITKERNELS_BUILD_CUDA=1 this file adds nothing and never imports torch, so a plain
``pip install -e .`` works anywhere. With it, torch's CUDAExtension compiles the
kernels with ninja for TORCH_CUDA_ARCH_LIST (default "8.0;9.0"):

    VITKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .

(--no-build-isolation: the build must see the torch it will run with.) Where it
cannot build (no torch, a CPU torch, no CUDA toolkit) it stops with one sentence
that says why. ``python -m vitkernels build`` is the just-in-time alternative.
"""

import os
import sys

from setuptools import setup

SOURCES = [
    "csrc/ops/relpos.cu",
    "csrc/ops/performer.cu",
    "csrc/ops/patch_embed.cu",
    "csrc/bindings.cpp",
]


def _fail(sentence: str) -> None:
    sys.exit(f"VITKERNELS_BUILD_CUDA=1: {sentence}")


def _cuda_extension() -> dict:
    if os.environ.get("VITKERNELS_BUILD_CUDA", "0").strip() in ("", "0"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _fail(
            "torch is not importable here; install torch first and build with --no-build-isolation"
        )
    if torch.version.cuda is None:
        _fail(
            f"the installed torch ({torch.__version__}) is a CPU build, so the CUDA extension "
            "cannot be built; install a CUDA build of torch or drop VITKERNELS_BUILD_CUDA"
        )
    if CUDA_HOME is None:
        _fail(
            f"no CUDA toolkit found (no nvcc on PATH and CUDA_HOME is unset); install the CUDA "
            f"{torch.version.cuda} toolkit or drop VITKERNELS_BUILD_CUDA"
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        name="vitkernels._C",
        sources=SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_cuda_extension())
