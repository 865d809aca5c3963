"""Backend selection shared by every op.

Each op has a list of backend objects in priority order. A backend answers
``not_supported_reasons(**inputs)`` with a list of plain sentences (empty when it
can run the inputs). Automatic dispatch takes the first backend with no reasons;
a forced backend (the ``backend=`` argument, ``use_backend(...)`` or the
``VITKERNELS_BACKEND`` environment variable, in that order) either supports the
inputs or raises ``BackendNotSupportedError`` naming the backend and the reasons.
When nothing fits, the error lists every backend and why each refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

BACKEND_NAMES = ("reference", "torch", "triton", "cuda")

# A plain module-level stack rather than a ContextVar: torch.compile traces reads
# of it (and guards on its contents, so a change recompiles), which it cannot do
# for a ContextVar. It is process-wide, not per thread.
_forced: list[str | None] = [None]


class BackendNotSupportedError(ValueError):
    """No (or not the requested) backend can run the given inputs."""


def _check_name(name: str, origin: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"{origin}: unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every vitkernels op inside the block onto one backend.

    ``use_backend(None)`` restores automatic dispatch inside the block.
    """
    if name is not None:
        _check_name(name, "use_backend")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def forced_backend(explicit: str | None = None, op: str | None = None) -> str | None:
    """The backend the caller forces, if any: argument, then context, then env.

    Under torch.compile the environment variable is read once, when the graph is
    traced; use_backend() blocks are guarded and recompile when they change.
    ``op`` names the op in the error for an unknown ``explicit`` name.
    """
    if explicit is not None:
        origin = f"{op}(backend={explicit!r})" if op else f"backend={explicit!r}"
        return _check_name(explicit, origin)
    ctx = _forced[-1]
    if ctx is not None:
        return ctx
    env = os.environ.get("VITKERNELS_BACKEND", "").strip()
    if env and env != "auto":
        return _check_name(env, "VITKERNELS_BACKEND")
    return None


# ----------------------------------------------------------------------------
# facts about the environment that several backends ask about


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_triton_error: list[str | None] = []  # filled once; a plain list so torch.compile traces it


def triton_import_error() -> str | None:
    """None when triton imports, else a sentence saying why not."""
    if not _triton_error:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the machine
            _triton_error.append(f"triton is not importable ({type(exc).__name__}: {exc})")
        else:
            _triton_error.append(None)
    return _triton_error[0]


def kernel_device_reasons(tensors: Sequence[torch.Tensor | None], *, allow_interpret: bool) -> list[str]:
    """Reasons a GPU-kernel backend cannot take tensors on their device."""
    reasons: list[str] = []
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        reasons.append(f"inputs are on different devices ({', '.join(sorted(map(str, devices)))})")
        return reasons
    dev = next(iter(devices)) if devices else torch.device("cpu")
    if dev.type == "cuda":
        return reasons
    if dev.type == "cpu" and allow_interpret and triton_interpret():
        return reasons
    hint = " (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)" if allow_interpret else ""
    reasons.append(f"needs CUDA tensors, got device {dev}{hint}")
    return reasons


def dtype_reasons(
    tensors: dict[str, torch.Tensor | None], allowed: Sequence[torch.dtype]
) -> list[str]:
    reasons = []
    names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
    for name, t in tensors.items():
        if t is not None and t.dtype not in allowed:
            reasons.append(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; supported: {names}")
    return reasons


class Backend:
    """One way to run one op. Subclasses set ``name`` and implement both methods.

    ``gpu_kernel = True`` marks a backend that automatic dispatch never picks for
    CPU tensors (the Triton interpreter is for tests; force it to use it).
    """

    name: str = ""
    gpu_kernel: bool = False

    def not_supported_reasons(self, **inputs: Any) -> list[str]:
        raise NotImplementedError

    def __call__(self, **inputs: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.name!r}>"


_explaining: list[bool] = [False]


class _Explained(Exception):
    def __init__(self, chosen: str | None, verdicts: list[tuple[str, list[str]]]):
        super().__init__(chosen)
        self.chosen, self.verdicts = chosen, verdicts


def explain_call(fn: Any, *args: Any, **kwargs: Any) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """Which backend ``fn(*args, **kwargs)`` (a public op) would run, without running it.

    Returns (chosen backend name or None, [(backend, reasons it refuses)]).
    """
    _explaining.append(True)
    try:
        fn(*args, **kwargs)
    except _Explained as e:
        return e.chosen, e.verdicts
    finally:
        _explaining.pop()
    raise RuntimeError(f"{fn!r} did not go through backend selection")


def select(op: str, backends: Sequence[Backend], explicit: str | None, **inputs: Any) -> Backend:
    """Pick the backend that runs ``op`` on ``inputs``."""
    if _explaining[-1]:
        verdicts = []
        for b in backends:
            verdicts.append((b.name, b.not_supported_reasons(**inputs)))
        try:
            chosen: str | None = _select(op, backends, explicit, **inputs).name
        except BackendNotSupportedError:
            chosen = None
        raise _Explained(chosen, verdicts)
    return _select(op, backends, explicit, **inputs)


def _select(op: str, backends: Sequence[Backend], explicit: str | None, **inputs: Any) -> Backend:
    forced = forced_backend(explicit, op)
    if forced is not None:
        for b in backends:
            if b.name == forced:
                reasons = b.not_supported_reasons(**inputs)
                if reasons:
                    raise BackendNotSupportedError(
                        f"{op}: backend {forced!r} cannot run these inputs: " + "; ".join(reasons)
                    )
                return b
        raise BackendNotSupportedError(
            f"{op}: backend {forced!r} is not available for this op; "
            f"available: {', '.join(b.name for b in backends)}"
        )
    on_cpu = all(
        v.device.type != "cuda" for v in inputs.values() if isinstance(v, torch.Tensor)
    )
    refusals = []
    for b in backends:
        if b.gpu_kernel and on_cpu:
            refusals.append(f"  {b.name}: not chosen automatically for CPU tensors (force it to use it)")
            continue
        reasons = b.not_supported_reasons(**inputs)
        if not reasons:
            return b
        refusals.append(f"  {b.name}: " + "; ".join(reasons))
    raise BackendNotSupportedError(f"{op}: no backend can run these inputs:\n" + "\n".join(refusals))


def explain(backends: Sequence[Backend], **inputs: Any) -> list[tuple[str, list[str]]]:
    """Every backend with its refusal reasons (empty list: it would run)."""
    return [(b.name, b.not_supported_reasons(**inputs)) for b in backends]
