"""What the Triton kernel modules share.

* dtype tables (``TRITON_TYPE``, ``SHORT``) and the float32 precision policy
  (``dot_precision``);
* ``alloc``: every buffer a launcher hands to a kernel (each module binds it to a
  module-level name that tests replace to poison the buffers with NaN);
* ``hint`` and ``mask2``: pointer and mask hints for vectorised accesses;
* ``Launch`` and ``launch``: one kernel launch, run on its tensors' device, or
  recorded instead of run inside ``recording()``.

Recording is how the ahead-of-time compiles (``_aot.py``, the compile-budget test)
and the compiler-based estimate (``vitkernels.estimate``) see exactly what the
launchers launch: a launcher called on meta tensors inside ``recording()`` runs
its host code unchanged, and every kernel launch becomes a ``Launch`` whose
``specialization`` is what Triton's JIT would compile for it. That comes from
Triton's own launch binder (``create_function_from_signature``, the function
``JITFunction.run`` calls, and ``JITFunction._pack_args``), so it follows
Triton's rules in whichever Triton is installed: a pointer whose address is a
multiple of 16 and an integer that is a multiple of 16 get
``tt.divisibility=16``, an integer equal to 1 becomes the constant 1. Meta
tensors have the addresses torch would give them on a GPU modulo 16: 0 plus the
storage offset, so a view one element into a buffer is misaligned there too.
The torch operations a launcher runs between its kernels (sums, slices, casts)
are recorded as ``TorchOp`` events: each one is a kernel launch on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "SHORT",
    "TRITON_TYPE",
    "Launch",
    "Recording",
    "Specialization",
    "TensorFactory",
    "TorchOp",
    "alloc",
    "cdiv",
    "device_guard",
    "dot_precision",
    "hint",
    "launch",
    "mask2",
    "recording",
]

TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SHORT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}

# Triton 3.6 (the GPU machine's) allocates registers differently from later versions:
# some launch configs depend on it (a config that spills on one and not the other)
TRITON_36 = tuple(int(x) for x in triton.__version__.split(".")[:2]) <= (3, 6)


def float32_tiles(t: torch.Tensor, on_cpu: bool = False) -> bool:
    """Whether a launch on ``t`` takes float32's own tiles: float32 on a GPU (and when
    recorded for one), whose dots hold more per operand than 16-bit ones. The
    interpreter (CPU tensors) keeps the 16-bit tiles in float32, the dtype its tests run
    those in (its bfloat16 arithmetic is wrong), unless ``on_cpu`` (a test's knob)."""
    return t.dtype == torch.float32 and (t.device.type != "cpu" or on_cpu)

# (shape, dtype) -> tensor: how recorded calls make their inputs (aligned or not)
TensorFactory = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def alloc(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer a launcher hands to a kernel (uninitialised)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype, float32: str = "ieee") -> str:
    """``input_precision`` of ``tl.dot`` for inputs of this dtype.

    16-bit inputs run on tensor cores in their own type and ignore it ("tf32" is
    passed). float32 inputs take ``float32``: "ieee" (exact float32 products on
    CUDA cores) where registers allow, "tf32x3" (three tf32 products, close to
    float32) where a kernel's tiles need tensor cores.
    """
    return float32 if dtype == torch.float32 else "tf32"


@triton.jit
def hint(base, offs, V0: tl.constexpr, V1: tl.constexpr):
    """base + offs: a 2-D pointer tile whose runs of V0 (dim 0) or V1 (dim 1)
    elements are contiguous and start at an address aligned to the run (the
    launcher checked this); lets the compiler vectorise the accesses without
    runtime alignment facts. (The hints attach to the add made here: a pointer
    that arrives as an argument would lose them.)"""
    ptrs = base + offs
    if V0 > 1 or V1 > 1:
        esz: tl.constexpr = ptrs.dtype.element_ty.primitive_bitwidth // 8
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [V0 * esz, V1 * esz]), [V0, V1])
    return ptrs


@triton.jit
def mask2(ok0, ok1, V0: tl.constexpr, V1: tl.constexpr):
    """ok0[:, None] & ok1[None, :], uniform over aligned runs of V0 rows / V1
    columns (the launcher checked the bound is a multiple of the run)."""
    mask = ok0[:, None] & ok1[None, :]
    if V0 > 1 or V1 > 1:
        mask = tl.max_constancy(mask, [V0, V1])
    return mask


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grid arithmetic (``triton.cdiv`` is a
    constexpr function: several microseconds per call from host code)."""
    return -(-a // b)


def _cuda_device(tensors: Sequence[Any]) -> torch.device | None:
    """The first CUDA tensor's device, if it is not the current device already."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            device = t.device
            return None if device.index == torch.cuda.current_device() else device
    return None


def device_guard(*tensors: Any) -> contextlib.AbstractContextManager:
    """Make the first CUDA tensor's device current (Triton launches on the current
    device); a no-op when it is current already and for CPU (interpreter) and meta
    tensors."""
    device = _cuda_device(tensors)
    return _NO_GUARD if device is None else torch.cuda.device(device)


_NO_GUARD = contextlib.nullcontext()  # reusable: enters and exits as often as asked


# ----------------------------------------------------------------------------
# launches


@dataclasses.dataclass(frozen=True)
class Specialization:
    """What Triton compiles for one launch: its ``ASTSource`` arguments and options."""

    signature: dict[str, str]  # argument -> "*bf16", "i32", "fp32", "constexpr", ...
    constexprs: dict[tuple, Any]  # argument path -> value (constexprs and specialised ints)
    attrs: dict[tuple, list]  # argument path -> [["tt.divisibility", 16]] or []
    options: dict[str, Any]  # the backend options (num_warps, num_stages, ...)
    arch: int

    def describe(self) -> dict[str, str]:
        """Readable: argument -> "*bf16 /16", "i32 /16", "i32", "=1", "=64", "fp32"."""
        out = {}
        for i, (name, ty) in enumerate(self.signature.items()):
            if ty == "constexpr":
                out[name] = f"={self.constexprs.get((i,))}"
            else:
                div = any(a[0] == "tt.divisibility" for a in self.attrs.get((i,), []))
                out[name] = ty + (" /16" if div else "")
        return out

    def key(self) -> str:
        """Equal for launches that compile to the same binary."""
        consts = {k: (v if isinstance(v, (int, float, bool, str)) else repr(v)) for k, v in self.constexprs.items()}
        opts = {k: self.options[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in self.options}
        return repr((sorted(self.signature.items()), sorted(consts.items()), sorted(self.attrs.items()),
                     sorted(opts.items()), self.arch))  # fmt: skip


@dataclasses.dataclass
class Launch:
    """One kernel launch, as a launcher makes it.

    reads / writes: the tensors the launch must read / write (each once: the
    estimate's bytes moved). loops: the mean trip count, per program, of each
    ``for`` loop of the kernel (and of the @triton.jit helpers it calls), keyed
    by the loop variable (the estimate matches them to the loops of the machine
    code); loops over a constexpr range that Triton unrolls need no entry.
    """

    name: str
    kernel: Any
    grid: tuple[int, ...]
    args: Sequence[Any]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    reads: Sequence[torch.Tensor | None] = ()
    writes: Sequence[torch.Tensor | None] = ()
    loops: dict[str, float] = dataclasses.field(default_factory=dict)
    specialization: Specialization | None = None  # set when recorded
    # ptxas's register limit per thread (PTX ``.maxnreg``; None: ptxas chooses). Where
    # its own choice (e.g. 128 at 8 warps, for two blocks an SM) spilled
    maxnreg: int | None = None

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n

    def run(self) -> None:
        with device_guard(*self.args):
            self.kernel[self.grid](*self.args, **self.constexprs, **self.options())

    def options(self) -> dict[str, int]:
        """The launch options Triton is given (maxnreg only where set)."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts

    def bytes_moved(self) -> tuple[int, int]:
        """(bytes read, bytes written), each tensor counted once."""
        return _nbytes(self.reads), _nbytes(self.writes)


@dataclasses.dataclass
class TorchOp:
    """A torch operation a launcher runs between kernels (one GPU kernel launch)."""

    name: str
    bytes_read: int
    bytes_written: int


def _nbytes(tensors: Sequence[torch.Tensor | None]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@dataclasses.dataclass
class Recording:
    """The launches (and torch operations) made inside ``recording()``, in order."""

    arch: int
    events: list[Launch | TorchOp] = dataclasses.field(default_factory=list)

    @property
    def launches(self) -> list[Launch]:
        return [e for e in self.events if isinstance(e, Launch)]


_recordings: list[Recording] = []


@contextlib.contextmanager
def recording(arch: int = 90) -> Iterator[Recording]:
    """Record instead of run every launch made inside the block (on meta tensors),
    each with Triton's specialisation for ``sm_<arch>``; torch operations run as
    usual and are recorded too."""
    rec = Recording(arch)
    _recordings.append(rec)
    try:
        with _TorchOpRecorder(rec):
            yield rec
    finally:
        _recordings.pop()


def target_arch(device: torch.device) -> int:
    """The compute capability (e.g. 90) launches on this device compile for: the one
    being recorded inside ``recording()``, else the device's (90 off CUDA: the
    interpreter)."""
    if _recordings:
        return _recordings[-1].arch
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def sm_count(device: torch.device) -> int:
    """The device's SMs; off CUDA (recordings on meta tensors, the interpreter) 132, the
    H100's and H200's, which the launchers' wave counts and the estimate assume."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def launch(spec: Launch) -> None:
    """Run the launch, or record it inside ``recording()``."""
    if not _recordings:
        spec.run()
        return
    rec = _recordings[-1]
    spec.specialization = specialize(spec, rec.arch)
    rec.events.append(spec)


# aten operations that launch no kernel: allocation and aliasing
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view",
              "detach", "alias", "lift_fresh"}  # fmt: skip


class _TorchOpRecorder(TorchDispatchMode):
    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _NO_KERNEL):
            ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.rec.events.append(TorchOp(name, _nbytes(ins), _nbytes(outs)))
        return out


def _unspecialized(kernel: Any) -> tuple[tuple, tuple]:
    """The kernel's ``do_not_specialize`` and ``do_not_specialize_on_alignment`` (as
    ``triton.jit`` was given them; a JITFunction keeps them, the interpreter's
    InterpretedFunction keeps its keyword arguments)."""
    kw = getattr(kernel, "kwargs", None) or {}
    dns = getattr(kernel, "do_not_specialize", None) or kw.get("do_not_specialize") or ()
    dnsoa = getattr(kernel, "do_not_specialize_on_alignment", None) or kw.get("do_not_specialize_on_alignment") or ()
    return tuple(dns), tuple(dnsoa)


def _binder(kernel: Any, arch: int) -> tuple[Any, Any, Any]:
    """(JITFunction, backend, binder) for a kernel (a JITFunction, or the interpreter's
    function): its Python function with the kernel's own ``do_not_specialize`` lists,
    so the recorded specialisation is the one ``JITFunction.run`` compiles."""
    return _binder_of(getattr(kernel, "fn", kernel), arch, *_unspecialized(kernel))


@functools.cache
def _binder_of(fn: Any, arch: int, dns: tuple = (), dnsoa: tuple = ()) -> tuple[Any, Any, Any]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = JITFunction(fn, do_not_specialize=list(dns), do_not_specialize_on_alignment=list(dnsoa))
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return jit, backend, create_function_from_signature(jit.signature, jit.params, backend)


def specialize(spec: Launch, arch: int) -> Specialization:
    """Triton's own specialisation of this launch for ``sm_<arch>``: the steps of
    ``JITFunction.run`` up to the compile, with the launch's real arguments."""
    from triton import knobs

    jit, backend, binder = _binder(spec.kernel, arch)
    kwargs: dict[str, Any] = {**spec.constexprs, **spec.options()}
    kwargs["debug"] = jit.debug or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # as run() adds them, where they exist
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    bound, specialization, options = binder(*spec.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return Specialization(dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__), arch)
