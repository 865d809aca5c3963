"""Drop-in module replacement: ``optimize(model)`` and ``restore(model)``.

A *rule* recognises one kind of module (vit-pytorch's ``levit.Attention``,
timm's ``PatchEmbed``, ...) and builds a ``FusedModule`` for it. The fused
module *adopts* the original's parameters, buffers and submodules under the same
names (the same tensor objects), so ``state_dict()`` keys and values do not
change, checkpoints load either way, and ``restore`` can put the original back
with whatever the fused one was trained or moved to.

Rules live in ``rules_*.py`` modules beside this file; each calls
``register_rule`` at import time and is imported here automatically.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Iterable, Sequence

from torch import nn

from vitkernels.ops._dispatch import _check_name

__all__ = [
    "DEFAULT_OPS",
    "FusedModule",
    "OptimizeReport",
    "Rule",
    "optimize",
    "register_rule",
    "restore",
]

DEFAULT_OPS = ("patch_embed", "relpos_attention", "performer_attention", "attention")


class FusedModule(nn.Module):
    """Base of every module ``optimize`` installs.

    ``__init__(original, backend)`` adopts the original's parameters, buffers and
    submodules (same objects, same names) and copies its plain attributes, so the
    subclass's ``forward`` can use ``self.to_qkv``, ``self.heads`` and so on
    exactly as the original does.
    """

    op: str = ""
    # True for fused containers whose children may be replaced in turn (a T2T
    # patch embedding holding Transformer blocks): optimize visits them too
    visit_children: bool = False

    def __init__(self, original: nn.Module, backend: str | None = None) -> None:
        super().__init__()
        self._parameters = original._parameters.copy()
        self._buffers = original._buffers.copy()
        self._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
        self._modules = original._modules.copy()
        for key, value in original.__dict__.items():
            if not key.startswith("_") and key not in ("training",):
                self.__dict__.setdefault(key, value)
        self.training = original.training
        self.__dict__["_vk_original"] = original
        self.__dict__["_vk_backend"] = backend

    @property
    def backend(self) -> str | None:
        return self.__dict__["_vk_backend"]

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_vk_original"]

    def extra_repr(self) -> str:
        return f"op={self.op}, backend={self.backend or 'auto'}, replaces={type(self.original).__name__}"

    def to_original(self) -> nn.Module:
        """The original module, carrying this module's current tensors and mode."""
        orig = self.original
        for attr in ("_parameters", "_buffers", "_modules"):
            mine, theirs = getattr(self, attr), getattr(orig, attr)
            for key in list(theirs):
                if key in mine:
                    theirs[key] = mine[key]
        orig.train(self.training)
        return orig


@dataclasses.dataclass
class Rule:
    """Recognises modules of one source and builds their fused replacement.

    ``build(module, backend)`` returns the fused module, or a string saying why
    this recognised module is left as it is.
    """

    name: str  # e.g. "vit-pytorch levit.Attention"
    op: str  # the op the replacement runs: one of DEFAULT_OPS
    matches: object  # Callable[[nn.Module], bool]
    build: object  # Callable[[nn.Module, str | None], nn.Module | str]


_RULES: list[Rule] = []
_loaded = False


def register_rule(rule: Rule) -> Rule:
    _RULES.append(rule)
    return rule


def _load_rules() -> list[Rule]:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("rules_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True
    return _RULES


@dataclasses.dataclass
class Replacement:
    path: str
    source: str  # class name of the original
    rule: str
    op: str
    backend: str


@dataclasses.dataclass
class LeftAlone:
    path: str
    source: str
    rule: str
    reason: str


@dataclasses.dataclass
class OptimizeReport:
    replaced: list[Replacement] = dataclasses.field(default_factory=list)
    left: list[LeftAlone] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"vitkernels.optimize: {len(self.replaced)} replaced, {len(self.left)} left"]
        for r in self.replaced:
            lines.append(f"  replaced {r.path or '<root>'} ({r.source}) -> {r.op} [{r.backend}]")
        for r in self.left:
            lines.append(f"  left     {r.path or '<root>'} ({r.source}): {r.reason}")
        return "\n".join(lines)

    def count(self, op: str | None = None) -> int:
        return sum(1 for r in self.replaced if op is None or r.op == op)


def _children(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    return [(k, m) for k, m in module._modules.items() if m is not None]


def optimize(
    model: nn.Module,
    *,
    backend: str | None = None,
    ops: Sequence[str] = DEFAULT_OPS,
) -> OptimizeReport:
    """Swap, in place, every recognised module of ``model`` for a fused one.

    Args:
        model: any nn.Module (this repo's models, vit-pytorch's, timm's).
        backend: force the fused modules onto one backend ("reference", "torch",
            "triton", "cuda"); None dispatches automatically on every call.
        ops: which kinds of replacement to make (a subset of DEFAULT_OPS).

    Returns:
        An OptimizeReport listing every replaced module (path, op, backend) and
        every recognised module left alone with the reason.
    """
    if backend is not None:
        _check_name(backend, "optimize(backend=)")
    unknown = sorted(set(ops) - set(DEFAULT_OPS))
    if unknown:
        raise ValueError(f"optimize: unknown ops {unknown}; expected a subset of {DEFAULT_OPS}")
    rules = [r for r in _load_rules() if r.op in ops]
    report = OptimizeReport()

    def visit_children(module: nn.Module, path: str) -> None:
        for child_name, child in _children(module):
            visit(module, child_name, f"{path}.{child_name}" if path else child_name, child)

    def visit(parent: nn.Module | None, name: str, path: str, module: nn.Module) -> None:
        if isinstance(module, FusedModule):  # already fused (an earlier optimize)
            if module.visit_children:
                visit_children(module, path)
            return
        for rule in rules:
            if not rule.matches(module):
                continue
            result = rule.build(module, backend)
            if isinstance(result, str):
                report.left.append(LeftAlone(path, type(module).__name__, rule.name, result))
                break
            if parent is None:
                raise ValueError(
                    "optimize: the model itself is a replaceable module "
                    f"({type(module).__name__}); wrap it in a container to optimize it in place"
                )
            parent._modules[name] = result
            # a fused module may run another backend than the one asked for (plain
            # attention runs SDPA whatever is forced): report what it runs
            runs = getattr(result, "backend", None) or backend or "auto"
            report.replaced.append(
                Replacement(path, type(module).__name__, rule.name, rule.op, runs)
            )
            if getattr(result, "visit_children", False):
                visit_children(result, path)
            return
        visit_children(module, path)

    visit(None, "", "", model)
    return report


def restore(model: nn.Module) -> int:
    """Put back every original module that ``optimize`` replaced; returns how many."""
    found: list[tuple[nn.Module, str, FusedModule]] = []

    def visit(module: nn.Module) -> None:
        for name, child in _children(module):
            visit(child)
            if isinstance(child, FusedModule):
                found.append((module, name, child))

    visit(model)
    for parent, name, fused in found:  # children before parents
        parent._modules[name] = fused.to_original()
    return len(found)
