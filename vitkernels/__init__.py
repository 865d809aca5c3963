"""vitkernels: fused Triton and CUDA kernels for Vision Transformers.

Public API:
    relpos_attention, performer_attention, patch_embed   the three ops
    optimize, restore                                    drop-in module replacement
    use_backend                                          force a backend in a block
    BackendNotSupportedError                             raised when no backend fits
"""

from __future__ import annotations

import importlib
from typing import Any

from vitkernels.ops._dispatch import BACKEND_NAMES, BackendNotSupportedError, use_backend

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so that `import vitkernels`
# stays cheap and never needs triton or CUDA.
_LAZY = {
    "relpos_attention": "vitkernels.ops.relpos",
    "performer_attention": "vitkernels.ops.performer",
    "patch_embed": "vitkernels.ops.patch_embed",
    "head_mixing_attention": "vitkernels.ops.head_mixing",
    "optimize": "vitkernels.replace",
    "restore": "vitkernels.replace",
    "OptimizeReport": "vitkernels.replace",
}

__all__ = [
    "BACKEND_NAMES",
    "BackendNotSupportedError",
    "use_backend",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitkernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
