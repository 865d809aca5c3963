"""The eager model zoo, installed as ``vitkernels.models``.

One file per family, constructors and parameter names identical to lucidrains
vit-pytorch 1.26.x so that its ``state_dict()`` loads into ours with
``strict=True``. Each family module exports ``CONFIGS``: a dict from a named
configuration to a factory taking keyword overrides.

    from vitkernels.models import create, list_models
    model = create("levit_256", num_classes=10)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

_FAMILIES = (
    "vit", "deepvit", "cait", "t2t", "t2t_vit", "crossvit", "pit", "levit", "cvt", "distill",
)  # fmt: skip


def _registry() -> dict[str, Callable[..., nn.Module]]:
    reg: dict[str, Callable[..., nn.Module]] = {}
    for fam in _FAMILIES:
        mod = importlib.import_module(f"{__name__}.{fam}")
        for name, factory in getattr(mod, "CONFIGS", {}).items():
            if name in reg:
                raise RuntimeError(f"model name {name!r} is defined twice (second in {fam})")
            reg[name] = factory
    return reg


def list_models() -> list[str]:
    """Names accepted by ``create``, sorted."""
    return sorted(_registry())


def create(name: str, **overrides: Any) -> nn.Module:
    """Build a named configuration; keyword overrides replace its constructor arguments."""
    reg = _registry()
    if name not in reg:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(sorted(reg))}")
    return reg[name](**overrides)


def __getattr__(name: str) -> Any:
    # `vitkernels.models.ViT` etc.: look the class up in the family modules.
    for fam in _FAMILIES:
        mod = importlib.import_module(f"{__name__}.{fam}")
        if name in getattr(mod, "__all__", ()):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
