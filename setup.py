"""Builds the optional CUDA extension ``vitkernels._C`` from csrc/.

Everything else (metadata, packages) is in pyproject.toml. Without
VITKERNELS_BUILD_CUDA=1 this file adds nothing and never imports torch, so a plain
``pip install -e .`` works anywhere. With it, torch's CUDAExtension compiles the
kernels with ninja for TORCH_CUDA_ARCH_LIST (default "8.0;9.0"):

    VITKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .

(--no-build-isolation: the build must see the torch it will run with.) The
toolkit is $CUDA_HOME, else the one the nvcc on PATH runs from (vitkernels/_toolkit.py
asks nvcc, so a wrapper script outside the toolkit is followed). The library uses
ATen and torch/library.h only (py_limited_api: no libtorch_python, no Python C API)
and is loaded with torch.ops.load_library. Where it cannot build (no torch, a CPU
torch, no CUDA toolkit, no libcudart) it stops with one sentence that says why.
``python -m vitkernels build`` is the just-in-time alternative.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent

SOURCES = [
    "csrc/ops/relpos.cu",
    "csrc/ops/performer.cu",
    "csrc/ops/patch_embed.cu",
    "csrc/bindings.cpp",
]


def _fail(sentence: str) -> None:
    sys.exit(f"VITKERNELS_BUILD_CUDA=1: {sentence}")


def _toolkit_module():
    """vitkernels/_toolkit.py, loaded by path (importing the package would import torch)."""
    spec = importlib.util.spec_from_file_location(
        "_vitkernels_toolkit", ROOT / "vitkernels" / "_toolkit.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension() -> dict:
    if os.environ.get("VITKERNELS_BUILD_CUDA", "0").strip() in ("", "0"):
        return {}
    try:
        import torch
    except ImportError:
        _fail(
            "torch is not importable here; install torch first and build with --no-build-isolation"
        )
    if torch.version.cuda is None:
        _fail(
            f"the installed torch ({torch.__version__}) is a CPU build, so the CUDA extension "
            "cannot be built; install a CUDA build of torch or drop VITKERNELS_BUILD_CUDA"
        )
    toolkit = _toolkit_module()
    try:
        home = toolkit.cuda_home(torch.version.cuda)
    except toolkit.ToolkitError as exc:
        _fail(str(exc))
    # torch's cpp_extension reads CUDA_HOME when it is imported: set it first, and on the
    # module too in case something imported it already
    os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = cpp_extension.CUDAExtension(
        name="vitkernels._C",
        sources=SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        library_dirs=[toolkit.cudart_dir(home)],
        py_limited_api=True,
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**_cuda_extension())
