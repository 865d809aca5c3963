"""Helpers the rules share: recognising a class, checking a layout, and checking
at optimize time that a fused module computes the original's function.

A rule replaces a module outright only when every method the fused forward
stands in for is the recognised class's own as written (the class itself, or a
subclass that overrides none of its methods). Otherwise (a subclass with its own
``forward`` or ``prm_exp``, a copy of the official code under any module path)
``plan_for`` runs ``same_function``: a copy of the module with random parameters
in float64, the original and the fused forward on the same random input, and
the module is replaced only when they agree.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vitkernels.replace import FusedModule, Plan, install

__all__ = [
    "input_width",
    "known_class",
    "missing",
    "overridden",
    "plan_for",
    "qualname",
    "random_input",
    "same_function",
    "subclass_of",
]

Layout = dict[str, type | tuple[type, ...]]
NUM = (int, float)


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def known_class(module: nn.Module, names: frozenset[str]) -> type | None:
    """The first class in the module's MRO whose "module.path.ClassName" is in
    ``names`` (the class itself or an ancestor), or None. A name may hold ``*``
    wildcards ("vitkernels.models.t2t*.Attention": this package's T2T-ViT files,
    however they are split)."""
    for klass in type(module).__mro__:
        name = qualname(klass)
        if name in names or any("*" in n and fnmatch.fnmatchcase(name, n) for n in names):
            return klass
    return None


def subclass_of(*names: str) -> Callable[[nn.Module], bool]:
    """Matcher for modules of one of the classes "module.path.ClassName" (wildcards
    as in ``known_class``) or of a subclass of one (neither vit-pytorch nor timm is
    imported to match)."""
    known = frozenset(names)
    return lambda m: known_class(m, known) is not None


def overridden(module: nn.Module, known: type) -> list[str]:
    """Methods of ``known`` (its own or inherited, nn.Module's included) that a class
    between the module's class and ``known`` redefines; ``__init__`` aside."""
    out: list[str] = []
    for klass in type(module).__mro__:
        if klass is known:
            break
        if issubclass(klass, FusedModule):
            continue
        for name, value in vars(klass).items():
            if name == "__init__" or name in out or not hasattr(known, name):
                continue
            if callable(value) or isinstance(value, (property, staticmethod, classmethod)):
                out.append(name)
    return out


def missing(module: nn.Module, layout: Layout) -> list[str]:
    """The attributes of ``layout`` the module lacks or holds with another type."""
    out = []
    for name, kind in layout.items():
        value = getattr(module, name, None)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            got = "missing" if value is None else type(value).__name__
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            out.append(f"{name} ({got}, expected {want})")
    return out


def input_width(m: nn.Module) -> int | None:
    """Features (Linear) or channels (Conv2d) the first such layer in ``m`` takes: the
    input width of a projection (Linear_BN, ConvNorm, DepthWiseConv2d, ...)."""
    for s in m.modules():
        if isinstance(s, nn.Linear):
            return s.in_features
        if isinstance(s, nn.Conv2d):
            return s.in_channels
    return None


def _tensors(out: Any) -> list[torch.Tensor] | None:
    """The tensors of an output (a tensor or tuples/lists of them), None for other values."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        parts = [_tensors(o) for o in out]
        return None if any(p is None for p in parts) else [t for p in parts for t in p]
    return None


def _probe(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the module in ``dtype`` and eval mode, without hooks, with every
    floating parameter perturbed (zero-initialised norms and bias tables would hide
    the attention from the output), from a fixed seed (the global RNG is left alone)."""
    probe = copy.deepcopy(module)
    for m in probe.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            getattr(m, hooks, {}).clear()  # fmt: skip
    probe.to(dtype)
    with torch.no_grad():
        for i, p in enumerate(probe.parameters()):
            if p.is_floating_point():
                g = torch.Generator(device=p.device).manual_seed(1000 + i)
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype, device=p.device))
    # train() then eval(): the originals' own eval-time caches (timm LeViT's
    # attention_bias_cache, the official LeViT's ab) are rebuilt from the new values
    probe.train()  # (timm's LeViT attention returns None from train())
    probe.eval()
    return probe


def random_input(shape: Sequence[int], like: nn.Module, seed: int = 0) -> torch.Tensor:
    """An N(0, 1) tensor on the device and in the floating dtype of the module's
    parameters, from a fixed seed."""
    t = next((p for p in like.parameters() if p.is_floating_point()), None)
    device = t.device if t is not None else torch.device("cpu")
    dtype = t.dtype if t is not None else torch.float32
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=dtype, device=device)


def _run_both(
    module: nn.Module, mixin: type[FusedModule], spec: Any, inputs: Callable, run: Callable,
    dtype: torch.dtype,
) -> tuple[Any, Any]:
    """The original's and the fused form's outputs on a probe in ``dtype``;
    raises _OriginalFailed when the original cannot run."""
    try:
        probe = _probe(module, dtype)
        args = inputs(probe)
        with torch.no_grad():
            want = run(probe, args)
    except Exception as exc:
        raise _OriginalFailed(f"{type(exc).__name__}: {exc}") from exc
    install(probe, mixin, spec, "reference")
    with torch.no_grad():
        return want, run(probe, args)


class _OriginalFailed(Exception):
    pass


def same_function(
    module: nn.Module,
    mixin: type[FusedModule],
    spec: Any,
    inputs: Callable[[nn.Module], tuple[Any, ...]],
    *,
    call: Callable[[nn.Module, tuple[Any, ...]], Any] | None = None,
) -> str | None:
    """None when the fused module computes what the original does, else why not.

    ``inputs(probe)`` makes the arguments for the module's forward
    (``random_input``); ``call(module, args)`` runs it (default
    ``module(*args)``). Both run on a copy with perturbed parameters
    (``_probe``), the fused one on the reference backend: in float64 (agreement
    to 1e-6 of the output's magnitude), or in float32 (to 1e-4) for a module whose
    own math does not run in float64 (the official Token_performer computes its
    features in float32 whatever its dtype).
    """
    run = call or (lambda m, args: m(*args))
    if any(t.device.type == "meta" for t in module.parameters()):
        return "its parameters are on the meta device, so the optimize-time check cannot run it"
    failure = ""
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
        try:
            want, got = _run_both(module, mixin, spec, inputs, run, dtype)
        except _OriginalFailed as exc:
            failure = str(exc)
            continue
        except Exception as exc:
            return f"the fused form fails where the original runs ({type(exc).__name__}: {exc})"
        want_t, got_t = _tensors(want), _tensors(got)
        if want_t is None or got_t is None or [t.shape for t in want_t] != [t.shape for t in got_t]:
            return "the fused form returns something else than the original (another structure or shape)"
        scale = max([1e-3] + [t.abs().max().item() for t in want_t if t.numel()])
        err = max([0.0] + [(g - w).abs().max().item() for g, w in zip(got_t, want_t, strict=True) if w.numel()])
        if not err <= tol * scale:
            return (
                f"the fused op computes another function (max difference {err / scale:.2g} "
                "relative to the output on a random input)"
            )
        return None
    return f"the optimize-time check could not run the original ({failure})"


def plan_for(
    module: nn.Module,
    known: frozenset[str],
    mixin: type[FusedModule],
    spec: Any,
    inputs: Callable[[nn.Module], tuple[Any, ...]],
    *,
    call: Callable[[nn.Module, tuple[Any, ...]], Any] | None = None,
) -> Plan | str:
    """The plan (mixin, spec) when the module is a known class as written, or when
    the optimize-time check shows the fused form computes its function; else why not."""
    base = known_class(module, known)
    changed = [] if base is None else overridden(module, base)
    if base is not None and not changed:
        return Plan(mixin, spec)
    why = same_function(module, mixin, spec, inputs, call=call)
    if base is None:
        what = f"{type(module).__name__} is not a class vitkernels knows as written"
    else:
        what = f"{type(module).__name__} overrides {', '.join(changed)} of {base.__name__}"
    if why is not None:
        return f"{what}, and {why}"
    return Plan(mixin, spec, checked=f"{what}; checked at optimize time on a random input")
