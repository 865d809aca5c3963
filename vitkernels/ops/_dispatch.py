"""Backend selection shared by every op, after xformers' fmha dispatch.

An op describes one call as an ``Inputs``: its tensors by name, the sizes that
backends limit, and the keyword arguments a backend runs on. Each backend declares
what it supports as data (class attributes of a ``Backend`` subclass: devices,
dtypes, minimum CUDA compute capability, which gradients are not deterministic,
size limits, what must be installed), and one function,
``Backend.not_supported_reasons``, checks an ``Inputs`` against all of it and
answers with plain sentences (none: it can run them).

Automatic dispatch takes the first backend in the op's priority list with no
reasons (a backend that declares ``auto_if_faster_than`` also needs the speed
evidence of vitkernels/evidence.py on its side, else it is passed over with the
evidence as the reason); when none fits, one error prints a summary of the inputs and then each
backend's refusal. A forced backend (the ``backend=`` argument, ``use_backend(...)``
or the ``VITKERNELS_BACKEND`` environment variable, in that order) either supports
the inputs or raises ``BackendNotSupportedError`` naming the backend and the
unsupported properties. Dispatch runs inside ``torch.compile(fullgraph=True)``
graphs: everything here is plain Python that dynamo traces.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

BACKEND_NAMES = ("reference", "torch", "triton", "cuda")

# A plain module-level stack rather than a ContextVar: torch.compile traces reads
# of it (and guards on its contents, so a change recompiles), which it cannot do
# for a ContextVar. It is process-wide, not per thread.
_forced: list[str | None] = [None]

HALF = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the Triton interpreter computes bfloat16 wrongly (TRITON_INTERPRET=1 on CPU tensors)
INTERPRETER_DTYPES = (torch.float16, torch.float32)


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
# facts about the environment that backends declare a need for


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(_dtype_name(d) for d in dtypes)


# ----------------------------------------------------------------------------
# one call, as dispatch sees it


class Inputs:
    """One call of an op, as dispatch sees it.

    Args:
        op: the op's name (for messages).
        tensors: every tensor argument by name; None for an absent optional one.
        params: the names among ``tensors`` checked against a backend's
            ``param_dtypes`` (parameters such as a bias table or random features
            that may have another dtype than the activations).
        sizes: the sizes backends limit, by the name their limits use.
        kwargs: the keyword arguments a backend's ``run`` takes.
    """

    def __init__(
        self,
        op: str,
        tensors: Mapping[str, torch.Tensor | None],
        *,
        params: Sequence[str] = (),
        sizes: Mapping[str, int] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.op = op
        self.tensors = tensors
        self.params = params
        self.sizes = sizes if sizes is not None else {}
        self.kwargs = kwargs if kwargs is not None else {}

    @property
    def device(self) -> torch.device:
        for t in self.tensors.values():
            if t is not None:
                return t.device
        return torch.device("cpu")

    def summary(self) -> str:
        """The inputs, one line per tensor, then the limited sizes."""
        width = max((len(n) for n in self.tensors), default=0)
        lines = [
            f"  {name:<{width}}  shape {tuple(t.shape)}, {_dtype_name(t.dtype)}, {t.device}"
            + (", requires grad" if t.requires_grad else "")
            for name, t in self.tensors.items()
            if t is not None
        ]
        if self.sizes:
            lines.append("  sizes: " + ", ".join(f"{k}={v}" for k, v in self.sizes.items()))
        return "\n".join(lines)


# ----------------------------------------------------------------------------
# backends


class Backend:
    """One way to run one op. A subclass declares its capabilities as the class
    attributes below and implements ``run``; ``not_supported_reasons`` checks them.

    Attributes:
        name: one of BACKEND_NAMES.
        devices: device types it runs on ("cuda", "cpu", ...); None: any.
        interpreter: also takes CPU tensors under TRITON_INTERPRET=1, in
            INTERPRETER_DTYPES only (the interpreter's bfloat16 is wrong).
        auto_on_cpu: automatic dispatch may pick it for CPU tensors (False for
            GPU kernels, whose interpreter is for tests: force it to use it).
        dtypes: dtypes of the tensors not in ``Inputs.params``; None: any.
        param_dtypes: dtypes of the tensors in ``Inputs.params``; None: as dtypes.
        min_compute_capability: (major, minor) a CUDA device must have.
        nondeterministic_grads: tensors whose gradient it sums in a run-to-run
            varying order (float atomics): refused for them under
            torch.use_deterministic_algorithms(True) when they need one.
        max_sizes: upper limits on ``Inputs.sizes`` entries of the same name.
        requirements: functions answering None, or a sentence saying what is
            missing here (triton, the CUDA extension) for it to run at all.
        auto_if_faster_than: another backend's name: automatic dispatch takes this
            one only where the speed evidence (vitkernels/evidence.py: a measurement,
            else the compiler-based estimate) says it is at least as fast as that
            one on the GPU's architecture; forcing it needs no evidence.
    """

    name: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...] | None] = None
    interpreter: ClassVar[bool] = False
    auto_on_cpu: ClassVar[bool] = True
    dtypes: ClassVar[tuple[torch.dtype, ...] | None] = None
    param_dtypes: ClassVar[tuple[torch.dtype, ...] | None] = None
    min_compute_capability: ClassVar[tuple[int, int] | None] = None
    nondeterministic_grads: ClassVar[frozenset[str]] = frozenset()
    max_sizes: ClassVar[Mapping[str, int]] = {}
    requirements: ClassVar[tuple[Callable[[], str | None], ...]] = ()
    auto_if_faster_than: ClassVar[str | None] = None

    def run(self, inputs: Inputs) -> Any:
        raise NotImplementedError

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Why this backend cannot run ``inputs``, one sentence per property; [] if it can."""
        for requirement in self.requirements:
            missing = requirement()
            if missing is not None:
                return [missing]
        reasons: list[str] = []
        device = inputs.device
        interpreted = False
        if self.devices is not None and device.type not in self.devices:
            if self.interpreter and device.type == "cpu" and triton_interpret():
                interpreted = True
            else:
                hint = (
                    " (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"
                    if self.interpreter and device.type == "cpu"
                    else ""
                )
                wanted = " or ".join(d.upper() if d == "cuda" else d for d in self.devices)
                reasons.append(f"needs {wanted} tensors, got device {device}{hint}")
        refused: dict[tuple[torch.dtype, tuple[torch.dtype, ...] | None], list[str]] = {}
        for name, t in inputs.tensors.items():  # grouped: one sentence per dtype refused
            if t is None:
                continue
            allowed = self.param_dtypes if name in inputs.params else None
            allowed = allowed if allowed is not None else self.dtypes
            if allowed is not None and t.dtype not in allowed:
                refused.setdefault((t.dtype, allowed), []).append(name)
            elif interpreted and t.dtype not in INTERPRETER_DTYPES:
                refused.setdefault((t.dtype, None), []).append(name)
        for (dtype, allowed), names in refused.items():
            have = f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} dtype {_dtype_name(dtype)}"
            if allowed is not None:
                reasons.append(f"{have}; supported: {_dtype_names(allowed)}")
            else:
                reasons.append(
                    f"{have}, which the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) "
                    f"computes wrongly; supported there: {_dtype_names(INTERPRETER_DTYPES)} "
                    f"(run {_dtype_name(dtype)} on a GPU)"
                )
        if self.min_compute_capability is not None and device.type == "cuda":
            have = torch.cuda.get_device_capability(device)
            need = self.min_compute_capability
            if tuple(have) < tuple(need):
                reasons.append(
                    f"needs a GPU of compute capability {need[0]}.{need[1]} (sm_{need[0]}{need[1]}) "
                    f"or newer; {device} has {have[0]}.{have[1]} (sm_{have[0]}{have[1]})"
                )
        if self.nondeterministic_grads and torch.are_deterministic_algorithms_enabled():
            for name in self.nondeterministic_grads:
                t = inputs.tensors.get(name)
                if t is not None and t.requires_grad and torch.is_grad_enabled():
                    reasons.append(
                        f"torch.use_deterministic_algorithms(True) is set and its {name} "
                        "gradient is summed with float atomics (not deterministic)"
                    )
        for key, limit in self.max_sizes.items():
            value = inputs.sizes.get(key)
            if value is not None and value > limit:
                reasons.append(f"{key}={value} is above the kernels' limit of {limit}")
        return reasons

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.name!r}>"


# ----------------------------------------------------------------------------
# selection


def _passed_over(b: Backend, inputs: Inputs) -> list[str]:
    """Automatic dispatch only: why the evidence passes ``b`` over ([] if it does not)."""
    if b.auto_if_faster_than is None or inputs.device.type != "cuda":
        return []
    from vitkernels import evidence

    major, minor = torch.cuda.get_device_capability(inputs.device)
    tensors = [t for t in inputs.tensors.values() if t is not None]
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    first = next((t for n, t in inputs.tensors.items() if t is not None and n not in inputs.params), None)
    dtype = _dtype_name(first.dtype) if first is not None else ""
    why = evidence.passed_over(inputs.op, b.name, b.auto_if_faster_than, major, minor,
                               "fwd+bwd" if training else "fwd", dtype)  # fmt: skip
    return [f"passed over: {why}"] if why else []


def _auto_reasons(b: Backend, inputs: Inputs) -> list[str]:
    return b.not_supported_reasons(inputs) or _passed_over(b, inputs)


def _verdicts(
    backends: Sequence[Backend], inputs: Inputs, forced: str | None
) -> list[tuple[str, list[str]]]:
    """(backend name, its reasons) for each backend automatic dispatch would consider,
    in priority order, stopping at the first that fits; just the forced one when forced."""
    if forced is not None:
        for b in backends:
            if b.name == forced:
                return [(b.name, b.not_supported_reasons(inputs))]
        return [(forced, [f"not a backend of {inputs.op} (it has {', '.join(b.name for b in backends)})"])]
    on_cpu = inputs.device.type == "cpu"
    out = []
    for b in backends:
        if on_cpu and not b.auto_on_cpu:
            out.append((b.name, ["not chosen automatically for CPU tensors (force it to use it)"]))
            continue
        reasons = _auto_reasons(b, inputs)
        out.append((b.name, reasons))
        if not reasons:
            break
    return out


def select(backends: Sequence[Backend], inputs: Inputs, explicit: str | None = None) -> Backend:
    """The backend that runs ``inputs``; raises BackendNotSupportedError when none can."""
    forced = forced_backend(explicit, inputs.op)
    verdicts = _verdicts(backends, inputs, forced)
    name, reasons = verdicts[-1]
    if not reasons:
        return next(b for b in backends if b.name == name)
    if forced is not None:
        raise BackendNotSupportedError(
            f"{inputs.op}: backend {forced!r} cannot run these inputs: " + "; ".join(reasons)
        )
    refusals = "\n".join(f"  {n}: " + "; ".join(r) for n, r in verdicts)
    raise BackendNotSupportedError(
        f"{inputs.op}: no backend can run these inputs:\n{inputs.summary()}\n"
        f"each backend's refusal:\n{refusals}"
    )


def explain(
    backends: Sequence[Backend], inputs: Inputs, explicit: str | None = None
) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """Which backend would run ``inputs`` (None: none can), and every backend's reasons
    to refuse them (an empty list for one that can), without running anything."""
    forced = forced_backend(explicit, inputs.op)
    try:
        chosen: str | None = select(backends, inputs, explicit).name
    except BackendNotSupportedError:
        chosen = None
    skip_gpu = forced is None and inputs.device.type == "cpu"
    verdicts = []
    for b in backends:
        reasons = b.not_supported_reasons(inputs) if forced is not None else _auto_reasons(b, inputs)
        if skip_gpu and not b.auto_on_cpu and not reasons:
            reasons = ["not chosen automatically for CPU tensors (force it to use it)"]
        verdicts.append((b.name, reasons))
    return chosen, verdicts
