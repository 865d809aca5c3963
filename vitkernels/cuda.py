"""Finds, JIT-builds and loads the optional CUDA extension ``vitkernels._C``.

The extension registers its kernels as torch ops in the ``vitkernels_C``
namespace (``torch.ops.vitkernels_C.<name>``); each op module's ``cuda`` backend
calls them. Without the extension the package works on its other backends.
"""

from __future__ import annotations

import functools
import importlib

import torch


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str | None]:
    if not torch.cuda.is_available() and torch.version.cuda is None:
        return None, "the installed torch is a CPU build, so the CUDA extension cannot load"
    try:
        mod = importlib.import_module("vitkernels._C")
    except ImportError:
        return None, (
            "the CUDA extension vitkernels._C is not built "
            "(build it with `python -m vitkernels build` or "
            "`VITKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .`)"
        )
    return mod, None


def unavailable_reason() -> str | None:
    """None when the extension is loaded, else one sentence saying why not."""
    return _load()[1]


def is_built() -> bool:
    return _load()[0] is not None


def has_op(name: str) -> bool:
    """Whether the loaded extension registered ``torch.ops.vitkernels_C.<name>``."""
    if not is_built():
        return False
    return hasattr(torch.ops.vitkernels_C, name)


def op(name: str):
    """The extension's op ``name``; raises if the extension or the op is missing."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return getattr(torch.ops.vitkernels_C, name)
