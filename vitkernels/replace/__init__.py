"""Drop-in module replacement: ``optimize(model)`` and ``restore(model)``.

How a module is replaced: its class is swapped, in place, for a subclass of its
own class made once per (class, fused mixin) pair, with the mixin first in the
method resolution order::

    fused class = type(C.__name__, (FusedMixin, C), {...})   # C: the module's class
    module.__class__ = fused class                            # restore: back to C

The mixin overrides ``forward`` (or the one method the op replaces, such as a
Token_performer's ``single_attn``) to run the fused op; everything else is the
original's, on the original instance. So, by construction: the parameters,
buffers, submodules and state_dict are the same objects under the same names;
every method and attribute of the original class works (timm's
``set_input_size``, ``forward_intermediates``, ...); hooks registered on the
module keep firing; a module used at two places stays one module; isinstance
checks hold; and nothing is copied, so nothing can go stale. (FSDP2's
``fully_shard`` swaps classes the same way.) Where the fused path does not apply
to an input (another image size, an unbatched tensor), the mixin runs the
original forward, so callers see the original's result or its exception.

Names the mixins add all start with ``_vk`` (one public exception: the
``embed_tokens`` method of fused patch embeddings, the token protocol of
``vitkernels.tokens``); a fused module's per-instance facts (the backend, the
grid, ...) live in its ``_vk`` attribute, removed by ``restore``.

A *rule* (``rules_*.py`` beside this file, imported automatically; each calls
``register_rule``) recognises one kind of module and returns a ``Plan`` (the
mixin and the facts its forward needs) or a sentence saying why the module is
left as it is. Helpers for rules (matching a class and its subclasses, checking
a layout, the optimize-time check that a fused module computes the original's
function) are in ``_match.py``. A new op plugs in with a ``fused_<op>.py``
(mixins) and a ``rules_<op>.py`` (rules) and its name in ``DEFAULT_OPS``.
"""

from __future__ import annotations

import copyreg
import dataclasses
import importlib
import inspect
import pkgutil
import re
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from vitkernels.ops._dispatch import BACKEND_NAMES
from vitkernels.tokens import _has_hooks

__all__ = [
    "DEFAULT_OPS",
    "FusedModule",
    "LeftAlone",
    "OptimizeReport",
    "Plan",
    "Replacement",
    "Rule",
    "fused_class",
    "is_fused",
    "optimize",
    "register_rule",
    "restore",
]

DEFAULT_OPS = ("patch_embed", "relpos_attention", "performer_attention", "head_mixing_attention", "attention")
# ops whose modules are attention: an unrecognised attention-like module is reported
# when one of them is asked for (patch-embedding-like ones with "patch_embed")
ATTENTION_OPS = frozenset({"relpos_attention", "performer_attention", "head_mixing_attention", "attention"})


# ----------------------------------------------------------------------------
# fused classes


@dataclasses.dataclass(frozen=True)
class FusedState:
    """What ``optimize`` stores on a fused module (its ``_vk`` attribute)."""

    backend: str | None  # the forced backend, None: automatic on every call
    spec: Any  # the facts the mixin's forward needs (from the rule's Plan)


class FusedModule:
    """Root of every fused mixin (not an nn.Module: the module's own class is).

    Subclasses set ``_vk_op`` and override ``forward`` (or the method the op
    replaces). For each method a mixin overrides, the fused class also holds the
    original's as ``_vk_base_<name>``: the mixin calls it where the fused path
    does not apply. TorchScript cannot compile the ops' Python dispatch, so a
    scripted fused module runs the original's math; every override is written::

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.jit.is_scripting():
                return self._vk_base_forward(x)
            return self._vk_forward(x)

        @torch.jit.unused
        def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
            ...  # the fused path (torch.fx traces it: the ops are fx leaves)
    """

    # no class annotations here: TorchScript would take them for the module's
    _vk_op = ""
    # fused containers whose children may be replaced in turn (a T2T patch
    # embedding holding Token_performers); others' children are part of their math
    _vk_visit_children = False
    # properties of the mixin that TorchScript must not compile
    _vk_jit_unused = ()
    # the submodules (attribute names, dotted when nested) whose __call__ the fused
    # forward skips, folding their math into the op or reading their tensors: with a
    # hook on one of them or on a module inside it (vit-pytorch's Recorder on
    # ``attend``, torch.nn.utils.prune or weight_norm on a patch embedding's Linear,
    # a user's feature hook) or a global module hook, the original forward runs, so
    # that the hooks fire and what they compute is used (``_vk_hooked``)
    _vk_skips = ()
    # instances carry ``_vk``, a FusedState

    @classmethod
    def _vk_runs(cls, backend: str | None) -> str:
        """The backend the report names for a module fused with ``backend`` forced."""
        return backend or "auto"

    def _vk_restore(self) -> None:
        """Drop what the original may have cached from tensors the fused module changed."""

    def _vk_skipped(self) -> list[nn.Module]:
        """The submodules named in ``_vk_skips`` that the module has."""
        found = []
        for name in self._vk_skips:
            m: Any = self
            for part in name.split("."):
                m = getattr(m, part, None)
            if isinstance(m, nn.Module):
                found.append(m)
        return found

    def _vk_hooked(self) -> bool:
        """Whether a skipped submodule (``_vk_skipped``) or a module inside one has hooks,
        or global module hooks are registered: the fused forward must not skip their
        calls then, and runs the original instead."""
        return any(_has_hooks(m) for s in self._vk_skipped() for m in s.modules())

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        mine = f"vitkernels={self._vk_op} [{self._vk.backend or 'auto'}]"
        return f"{base}, {mine}" if base else mine

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickle / deepcopy: rebuild the fused class from the original class and the
        # mixin (both importable) rather than by its name, which is the original's
        reduced = super().__reduce_ex__(2)
        cls = type(self)
        if reduced[0] is copyreg.__newobj__ and "_vk_base" in cls.__dict__:
            return (_new_fused, (cls._vk_base, cls._vk_mixin), *reduced[2:])
        return reduced


_FUSED_CLASSES: dict[tuple[type, type], type] = {}
_INFRA = frozenset(vars(FusedModule))


def _renamed(fn: Any, name: str) -> Any:
    """A copy of function ``fn`` called ``name`` (TorchScript compiles a method under
    its function's name, and the fused class's own ``forward`` has that one)."""
    if not isinstance(fn, types.FunctionType):
        return fn
    copy = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__annotations__ = dict(fn.__annotations__)
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = f"{fn.__qualname__.rpartition('.')[0]}.{name}".lstrip(".")
    return copy


def _overrides(mixin: type) -> list[str]:
    """Methods the mixin (and its fused ancestors) define, infrastructure aside."""
    names: list[str] = []
    for klass in mixin.__mro__:
        if klass is FusedModule or not issubclass(klass, FusedModule):
            continue
        for name, value in vars(klass).items():
            if callable(value) and name not in _INFRA and not name.startswith("_vk") and name not in names:
                names.append(name)
    return names


def fused_class(base: type[nn.Module], mixin: type[FusedModule]) -> type[nn.Module]:
    """The fused class for modules of class ``base``: ``mixin`` first, then ``base``.

    Same ``__name__``, ``__qualname__`` and ``__module__`` as ``base``; made once
    per pair. ``_vk_base`` and ``_vk_mixin`` name the two.
    """
    key = (base, mixin)
    cls = _FUSED_CLASSES.get(key)
    if cls is None:
        ns: dict[str, Any] = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "_vk_base": base,
            "_vk_mixin": mixin,
        }
        for name in _overrides(mixin):
            if hasattr(base, name):
                ns[f"_vk_base_{name}"] = _renamed(getattr(base, name), f"_vk_base_{name}")
        # TorchScript reads a module's attribute types from its class annotations,
        # taken from the first class up the bases that has any: the original's
        ns["__annotations__"] = {
            k: v for klass in reversed(base.__mro__) for k, v in inspect.get_annotations(klass).items()
        }
        ns["__init__"] = _original_init(base)
        unused = [*getattr(base, "__jit_unused_properties__", ()), *mixin._vk_jit_unused]
        if unused:
            ns["__jit_unused_properties__"] = unused
        cls = type(base.__name__, (mixin, base), ns)
        _FUSED_CLASSES[key] = cls
    return cls


def _original_init(base: type[nn.Module]) -> Callable[..., None]:
    """The fused class's ``__init__``: a module the original's own code builds from
    ``self.__class__`` (nn.Sequential's slice ``seq[1:]``, vit-pytorch's MAE) is a new
    module optimize planned nothing for, so it is made of the original class."""

    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "__class__", base)
        base.__init__(self, *args, **kwargs)

    return __init__


def _new_fused(base: type[nn.Module], mixin: type[FusedModule]) -> nn.Module:
    cls = fused_class(base, mixin)
    return cls.__new__(cls)


def is_fused(module: nn.Module) -> bool:
    """Whether ``optimize`` swapped this module's class (restore can swap it back)."""
    return "_vk_base" in type(module).__dict__


def install(module: nn.Module, mixin: type[FusedModule], spec: Any, backend: str | None) -> None:
    """Swap ``module``'s class for its fused class and store what its forward needs."""
    module.__class__ = fused_class(type(module), mixin)
    module.__dict__["_vk"] = FusedState(backend, spec)


def uninstall(module: nn.Module) -> None:
    """Give ``module`` its original class back (the inverse of ``install``)."""
    cls = type(module)
    module._vk_restore()  # type: ignore[attr-defined]
    module.__class__ = cls._vk_base
    module.__dict__.pop("_vk", None)


# ----------------------------------------------------------------------------
# rules


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a rule decided for one module: install ``mixin`` with ``spec``.

    ``checked`` says how the rule knows the fused module computes the original's
    function when the module's class is not one it knows as written (a subclass
    overriding methods, a copy of the official code): the optimize-time check.
    """

    mixin: type[FusedModule]
    spec: Any = None
    checked: str = ""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Recognises modules of one kind and plans their replacement.

    ``matches(module)`` says whether the module is of the kind (a cheap test: the
    class, or the layout); ``build(module)`` returns a ``Plan``, or a sentence
    saying why this recognised module is left as it is.
    """

    name: str  # e.g. "timm levit.Attention"
    op: str  # the op the replacement runs: one of DEFAULT_OPS
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], Plan | str]


_RULES: list[Rule] = []
_loaded: list[bool] = []


def register_rule(rule: Rule) -> Rule:
    _RULES.append(rule)
    return rule


def _load_rules() -> list[Rule]:
    if not _loaded:
        _loaded.append(True)
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("rules_"):
                importlib.import_module(f"{__name__}.{info.name}")
    return _RULES


# ----------------------------------------------------------------------------
# the report


@dataclasses.dataclass
class Replacement:
    path: str
    source: str  # class name of the original
    rule: str
    op: str
    backend: str
    checked: str = ""  # how the function was checked at optimize time ("" : a known class)
    also_at: list[str] = dataclasses.field(default_factory=list)  # the same module elsewhere


@dataclasses.dataclass
class LeftAlone:
    path: str
    source: str
    rule: str  # "" when no rule recognises the module
    reason: str


def _ranges(nums: Iterable[int]) -> str:
    """{0-3,5}: sorted integers as runs."""
    nums = sorted(set(nums))
    runs, start = [], nums[0]
    for a, b in zip(nums, [*nums[1:], None], strict=True):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return "{" + ",".join(runs) + "}"


def summarise_paths(paths: Sequence[str], limit: int = 4) -> str:
    """Module paths in a few words: ``blocks.{0-11}.attn`` for paths that differ in
    an index (from the last index back), the first ``limit`` and a count for the rest."""
    rows = [tuple(re.split(r"(\d+)", p or "<root>")) for p in dict.fromkeys(paths)]
    if len({len(r) for r in rows}) == 1:
        for i in range(len(rows[0]) - 2, 0, -2):  # numeric tokens sit at odd positions
            groups: dict[tuple, list[str]] = {}
            for r in rows:
                groups.setdefault(r[:i] + ("",) + r[i + 1 :], []).append(r[i])
            if len(groups) == len(rows) or not all(t.isdigit() for ts in groups.values() for t in ts):
                continue
            rows = [
                key[:i] + ((ts[0] if len(ts) == 1 else _ranges(map(int, ts))),) + key[i + 1 :]
                for key, ts in groups.items()
            ]
    shown = ["".join(r) for r in rows]
    text = ", ".join(shown[:limit])
    return text if len(shown) <= limit else f"{text} and {len(shown) - limit} more"


@dataclasses.dataclass
class OptimizeReport:
    """What ``optimize`` replaced and what it left, with the reasons.

    ``str(report)``: one line per kind of replacement and per reason, with the
    count and the paths summarised.
    """

    replaced: list[Replacement] = dataclasses.field(default_factory=list)
    left: list[LeftAlone] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"vitkernels.optimize: {len(self.replaced)} replaced, {len(self.left)} left"]
        groups: dict[tuple, list[str]] = {}
        aliases: dict[tuple, list[str]] = {}
        for r in self.replaced:
            key = ("replaced", r.source, r.op, r.backend, r.checked)
            groups.setdefault(key, []).append(r.path)
            aliases.setdefault(key, []).extend(r.also_at)
        for r in self.left:
            groups.setdefault(("left", r.source, r.reason), []).append(r.path)
        for key, paths in groups.items():
            count = f"{len(paths)} x " if len(paths) > 1 else ""
            where = summarise_paths(paths)
            if aliases.get(key):
                where += f" (the same modules also at {summarise_paths(aliases[key])})"
            if key[0] == "replaced":
                _, source, op, backend, checked = key
                note = f" ({checked})" if checked else ""
                lines.append(f"  replaced {count}{source} -> {op} [{backend}]{note}: {where}")
            else:
                _, source, reason = key
                lines.append(f"  left     {count}{source}: {reason}: {where}")
        return "\n".join(lines)

    def count(self, op: str | None = None) -> int:
        """How many modules were replaced (with ``op``: by that op)."""
        return sum(1 for r in self.replaced if op is None or r.op == op)


# ----------------------------------------------------------------------------
# optimize / restore

# what an unrecognised module's class or attribute name says it is
_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)
_PATCH_NAME = re.compile(r"patch_?embed|embedder|convembedding|tokens_?to_?token|^stem", re.IGNORECASE)
_PROJECTIONS = ("qkv", "to_qkv", "to_q", "q", "wq", "kqv", "kv", "to_kv", "qk")  # qk: ConViT's GPSA
_PATCH_ATTRS = frozenset(
    {"patch_embed", "to_patch_embedding", "patch_embedding", "conv_embedding", "stem", "tokens_to_token"}
)


def _kind(module: nn.Module, name: str) -> str | None:
    """"attention" or "patch embedding" when the module's class or attribute name
    (or, for attention, a head count beside a q/qkv projection) says it is one,
    else None."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn") and cls is not nn.Sequential:
        return None  # torch's own layers (nn.MultiheadAttention is torch's business)
    if _ATTENTION_NAME.search(cls.__name__) or (
        isinstance(getattr(module, "heads", getattr(module, "num_heads", None)), int)
        and any(k in module._modules for k in _PROJECTIONS)
    ):
        return "attention"
    if _PATCH_NAME.search(cls.__name__) or name in _PATCH_ATTRS:
        return "patch embedding"
    return None


def _unrecognised_kind(module: nn.Module, name: str, rules: Sequence[Rule]) -> str | None:
    """The kind of an attention or patch-embedding module no rule knows; None for
    other modules and for containers of such modules (a block holding its attention)."""
    kind = _kind(module, name)
    if kind is None:
        return None
    for child_name, child in module.named_modules():
        if child is module:
            continue
        if _kind(child, child_name.rpartition(".")[2]) == kind or any(r.matches(child) for r in rules):
            return None
    return kind


def _check_ops(ops: Any) -> tuple[str, ...]:
    if isinstance(ops, str):
        ops = (ops,)  # optimize(m, ops="attention")
    try:
        ops = tuple(ops)
    except TypeError:
        raise TypeError(
            f"optimize: ops={ops!r}; expected an op name or a sequence of them from {DEFAULT_OPS}"
        ) from None
    unknown = [o for o in ops if o not in DEFAULT_OPS]
    if unknown:
        raise ValueError(
            f"optimize: unknown ops {unknown} in ops={ops!r}; expected names from {DEFAULT_OPS}"
        )
    return ops


def _children(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    return [(k, m) for k, m in module._modules.items() if m is not None]


def optimize(
    model: nn.Module,
    *,
    backend: str | None = None,
    ops: str | Sequence[str] = DEFAULT_OPS,
) -> OptimizeReport:
    """Swap, in place, every recognised module of ``model`` for its fused form.

    Args:
        model: any nn.Module (this repo's models, vit-pytorch's, timm's, the
            official LeViT and T2T-ViT code); the model itself may be one.
        backend: force the fused modules onto one backend ("reference", "torch",
            "triton", "cuda"); None dispatches automatically on every call
            (``vitkernels.use_backend`` and ``VITKERNELS_BACKEND`` then apply).
        ops: which kinds of replacement to make: an op name or a sequence of
            names from DEFAULT_OPS.

    Returns:
        An OptimizeReport listing every replaced module (path, op, backend), every
        recognised module left as it is with the reason, and every attention or
        patch-embedding module no rule recognises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"optimize: expected an nn.Module to optimize in place, got "
            f"{type(model).__name__} {model!r:.60}"
        )
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(
            f"optimize(backend={backend!r}): unknown backend; expected None (automatic) or "
            f"one of {', '.join(BACKEND_NAMES)}"
        )
    ops = _check_ops(ops)
    rules = _load_rules()
    report = OptimizeReport()
    seen: dict[int, Replacement | None] = {}
    wanted_kinds = {"attention"} if ATTENTION_OPS & set(ops) else set()
    if "patch_embed" in ops:
        wanted_kinds.add("patch embedding")

    def visit_children(module: nn.Module, path: str) -> None:
        for name, child in _children(module):
            visit(child, name, f"{path}.{name}" if path else name)

    def visit(module: nn.Module, name: str, path: str) -> None:
        if id(module) in seen:  # a module used at two places: one module, one entry
            first = seen[id(module)]
            if first is not None:
                first.also_at.append(path)
            return
        seen[id(module)] = None
        if is_fused(module):  # by an earlier optimize
            if module._vk_visit_children:  # type: ignore[attr-defined]
                visit_children(module, path)
            return
        source = type(module).__name__
        for rule in rules:
            if not rule.matches(module):
                continue
            if rule.op not in ops:  # known, but the caller did not ask for this op
                break
            plan = rule.build(module)
            if isinstance(plan, str):
                report.left.append(LeftAlone(path, source, rule.name, plan))
                break
            install(module, plan.mixin, plan.spec, backend)
            entry = Replacement(
                path, source, rule.name, rule.op, plan.mixin._vk_runs(backend), plan.checked
            )
            report.replaced.append(entry)
            seen[id(module)] = entry
            if plan.mixin._vk_visit_children:
                visit_children(module, path)
            return
        else:
            kind = _unrecognised_kind(module, name, rules)
            if kind in wanted_kinds:
                report.left.append(
                    LeftAlone(path, source, "", f"no rule recognises this {kind} layout")
                )
        visit_children(module, path)

    visit(model, "", "")
    return report


def restore(model: nn.Module) -> int:
    """Give every module ``optimize`` replaced its original class back; returns how many.

    The modules keep their current tensors and mode (what was trained, loaded or
    moved while fused) and every hook; caches the originals keep (timm LeViT's
    eval-time bias cache) are cleared.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"restore: expected an nn.Module, got {type(model).__name__}")
    count = 0
    for path, module in model.named_modules():
        if is_fused(module):
            uninstall(module)
            count += 1
        elif isinstance(module, FusedModule):
            raise TypeError(
                f"restore: {path or '<root>'} is a {type(module).__qualname__} made from a fused "
                "module by another class swap (e.g. FSDP's fully_shard); restore before wrapping"
            )
    return count
