"""relpos_attention: LeViT attention with a relative-position bias (the spec is
``vitkernels.backends.reference.relpos_attention``).

    logits[b,h,i,j] = scale * <q_i, k_j> + bias_scale * table[h, |dr|*C + |dc|]
    out = softmax(logits) @ v

Keys sit on the grid fmap_size = (R, C), key j at (j // C, j % C); queries on that
grid subsampled by q_stride (LeViT's shrink attention), query i at
(s*(i // Cq), s*(i % Cq)) with Cq = ceil(C/s). q (B, H, Nq, Dk), k (B, H, Nk, Dk),
v (B, H, Nk, Dv), any strides (views of LeViT's 1x1 conv outputs are taken as they
are). The table is (H, R*C) for table_layout "hn" (official LeViT, timm) or
(R*C, H) for "nh" (vit-pytorch's nn.Embedding weight).

Backends, in automatic priority order: cuda (the compiled extension, where the speed
evidence says it is at least as fast as triton: vitkernels/evidence.py), triton, torch
(SDPA with the bias gathered and materialised; the automatic choice on CPU),
reference (the literal einsum math). The triton and cuda backends run through the
custom ops ``vitkernels::relpos_attention_fwd`` / ``_bwd`` (fake impls and autograd
registered), so they work under ``torch.compile(fullgraph=True)``; plain eager calls
run the same launchers without torch.library (vitkernels/ops/_fastpath.py); they never build
an (Nq x Nk) tensor, gradients included (the table's too). The triton backend's
table gradient is deterministic on both (per-program partials summed in a fixed
order, no atomics): the same inputs give the same bits run to run.

Precision: float16/bfloat16 inputs multiply in their own type on tensor cores; the
softmax, every accumulation and the table gradient's sums are float32. float32
inputs (triton only) multiply as tf32x3 (three TF32 products: near float32, never
plain TF32) with float32 sums, so they meet float32 tolerances: outputs within
1e-4 and gradients (the table's included) within 2e-4 of a float64 reference,
relative to its magnitude (what the tests and ``bench/gpu_check.sh`` require).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vitkernels import cuda as _cuda
from vitkernels.backends import reference as _reference
from vitkernels.backends import torch_ops as _torch_ops
from vitkernels.ops._checks import check_qkv
from vitkernels.ops._dispatch import (
    FLOAT_DTYPES,
    HALF,
    KERNEL_DTYPES,
    Backend,
    Inputs,
    _dtype_name,
    explain,
    select,
    triton_import_error,
)
from vitkernels.ops._fastpath import DecisionCache, direct_call_ok, needs_grad

__all__ = ["BACKENDS", "relpos_attention", "which_backend"]

_LAYOUTS = ("hn", "nh")

# the Triton kernels' limits: head dims (register tiles) and grid sides (the table
# row lives in registers; the table-gradient tiles are grid-row aligned)
TRITON_MAX_HEAD_DIM = 128
TRITON_MAX_SIDE = 64
# the CUDA extension's limits (csrc/kernels/relpos.cuh)
CUDA_MAX_HEAD_DIM = 128
CUDA_MAX_TABLE = 8192


# The triton backward raised an illegal memory access on a GPU at LeViT-256's 7 x 7
# stage in float16/bfloat16 (H200, triton 3.6, 2026-12-04, bench/NOTES.md), in one
# configuration of its dQ kernel (vitkernels.triton.relpos.faulting_dq; the Triton
# interpreter finds no out-of-bounds access). Until a GPU run shows a fix, the triton
# backend refuses calls that would take that backward (inputs that require grad, grad
# mode on) on CUDA tensors, and dispatch takes another backend for them;
# bench/ima_probe.py sets this False to run the kernel there on purpose.
REFUSE_FAULTING_BACKWARD_ON_GPU = True

# ----------------------------------------------------------------------------
# custom ops (the triton and cuda backends)


def _launchers(backend: str) -> tuple[Any, Any]:
    if backend == "cuda":
        return _cuda.op("relpos_attention_fwd"), _cuda.op("relpos_attention_bwd")
    if backend == "triton":
        from vitkernels.triton import relpos as tk

        return tk.relpos_attention_fwd, tk.relpos_attention_bwd
    raise ValueError(f"relpos_attention: kernel backend {backend!r}; expected 'triton' or 'cuda'")


@torch.library.custom_op("vitkernels::relpos_attention_fwd", mutates_args=())
def relpos_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    fmap_rows: int,
    fmap_cols: int,
    q_stride: int,
    scale: float,
    bias_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Nq, Dv), lse (B, H, Nq) float32); table is (H, R*C), any strides."""
    fwd, _ = _launchers(backend)
    out, lse = fwd(q, k, v, table, fmap_rows, fmap_cols, q_stride, scale, bias_scale)
    return out, lse


@relpos_attention_fwd.register_fake
def _(q, k, v, table, fmap_rows, fmap_cols, q_stride, scale, bias_scale, backend):
    B, H, Nq, _ = q.shape
    return q.new_empty((B, H, Nq, v.shape[-1])), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("vitkernels::relpos_attention_bwd", mutates_args=())
def relpos_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    fmap_rows: int,
    fmap_cols: int,
    q_stride: int,
    scale: float,
    bias_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dtable (H, R*C) in table's dtype)."""
    _, bwd = _launchers(backend)
    dq, dk, dv, dtable = bwd(
        grad_out, q, k, v, table, out, lse, fmap_rows, fmap_cols, q_stride, scale, bias_scale
    )
    return dq, dk, dv, dtable


@relpos_attention_bwd.register_fake
def _(grad_out, q, k, v, table, out, lse, fmap_rows, fmap_cols, q_stride, scale, bias_scale, backend):
    return (
        q.new_empty(q.shape),
        q.new_empty(k.shape),
        q.new_empty(v.shape),
        table.new_empty(table.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, table, fmap_rows, fmap_cols, q_stride, scale, bias_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, table, out, lse)
    ctx.args = (fmap_rows, fmap_cols, q_stride, scale, bias_scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, table, out, lse = ctx.saved_tensors
    *args, backend = ctx.args
    saved = (grad_out, q, k, v, table, out, lse)
    if direct_call_ok(saved):  # eager: the launcher itself (vitkernels/ops/_fastpath.py)
        dq, dk, dv, dtable = _launchers(backend)[1](*saved, *args)
    else:
        dq, dk, dv, dtable = relpos_attention_bwd(*saved, *args, backend)
    need = ctx.needs_input_grad
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        dtable if need[3] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


class _Direct(torch.autograd.Function):
    """The custom op's forward and backward without torch.library, for eager calls
    that ``direct_call_ok`` admits: the same launchers, saved tensors and gradients."""

    @staticmethod
    def forward(ctx, *args):  # the custom op's arguments, backend last
        out, lse = _launchers(args[-1])[0](*args[:-1])
        _setup_context(ctx, args, (out, lse))
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        return _backward(ctx, grad_out, grad_lse)


relpos_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _run_kernel(backend: str, inputs: Inputs) -> torch.Tensor:
    kw = inputs.kwargs
    q, k, v = kw["q"], kw["k"], kw["v"]
    table = kw["bias_table"] if kw["table_layout"] == "hn" else kw["bias_table"].t()  # (H, R*C) view
    R, C = kw["fmap_size"]
    args = (q, k, v, table, R, C, kw["q_stride"], kw["scale"], kw["bias_scale"])
    if not direct_call_ok(args[:4]):
        return relpos_attention_fwd(*args, backend)[0]
    if needs_grad(args[:4]):
        return _Direct.apply(*args, backend)[0]
    return _launchers(backend)[0](*args)[0]


# ----------------------------------------------------------------------------
# backends: capabilities as data (checked by Backend.not_supported_reasons)


def _extension_ops() -> str | None:
    reason = _cuda.unavailable_reason()
    if reason is None and not (
        _cuda.has_op("relpos_attention_fwd") and _cuda.has_op("relpos_attention_bwd")
    ):
        reason = "the CUDA extension has no relpos_attention_fwd/_bwd ops"
    return reason


class CudaBackend(Backend):
    name = "cuda"
    auto_if_faster_than = "triton"  # automatically only where the evidence says so
    devices = ("cuda",)
    auto_on_cpu = False
    dtypes = HALF  # q, k, v
    param_dtypes = KERNEL_DTYPES  # bias_table
    min_compute_capability = (8, 0)
    max_sizes = {"Dk": CUDA_MAX_HEAD_DIM, "Dv": CUDA_MAX_HEAD_DIM, "R*C": CUDA_MAX_TABLE}
    requirements = (_extension_ops,)

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _run_kernel("cuda", inputs)


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda",)
    interpreter = True
    auto_on_cpu = False
    dtypes = KERNEL_DTYPES
    min_compute_capability = (8, 0)
    max_sizes = {"Dk": TRITON_MAX_HEAD_DIM, "Dv": TRITON_MAX_HEAD_DIM, "max(R, C)": TRITON_MAX_SIDE}
    requirements = (triton_import_error,)

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if reasons or not REFUSE_FAULTING_BACKWARD_ON_GPU or inputs.device.type != "cuda":
            return reasons
        kw = inputs.kwargs
        if not (torch.is_grad_enabled() and any(kw[n].requires_grad for n in _TENSORS)):
            return reasons  # no backward: the forward kernels were right on the GPU
        from vitkernels.triton import relpos as tk
        from vitkernels.triton._common import target_arch

        q, v = kw["q"], kw["v"]
        R, C = kw["fmap_size"]
        dk, dv = q.shape[-1], v.shape[-1]
        aligned = tk.aligned_strides(q, kw["k"], v)
        if tk.faulting_dq(R, C, kw["q_stride"], dk, dv, q.dtype, target_arch(q.device), kw["scale"], aligned):
            reasons.append(
                f"the backward at a {R} x {C} grid with Dk={dk} in {_dtype_name(q.dtype)} raised an "
                "illegal memory access in the triton dQ kernel on a GPU (H200, 2026-12-04; "
                "LeViT's 7 x 7 stage at Dk 32), so its training calls run on another backend "
                "until a fix is shown on a GPU (inference is unaffected)"
            )
        return reasons

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _run_kernel("triton", inputs)


class TorchBackend(Backend):
    name = "torch"
    dtypes = FLOAT_DTYPES

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _torch_ops.relpos_attention(**inputs.kwargs)


class ReferenceBackend(Backend):
    name = "reference"

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _reference.relpos_attention(**inputs.kwargs)


BACKENDS: list[Backend] = [CudaBackend(), TritonBackend(), TorchBackend(), ReferenceBackend()]
_DECISIONS = DecisionCache("relpos_attention", BACKENDS)
_TENSORS = ("q", "k", "v", "bias_table")


# ----------------------------------------------------------------------------
# public function


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"relpos_attention: {name} must be an int, got {value!r}")
    return int(value)


def _fmap(fmap_size: Any) -> tuple[int, int]:
    if isinstance(fmap_size, (tuple, list, torch.Size)) and len(fmap_size) == 2:
        R, C = (_int("fmap_size", s) for s in fmap_size)
    elif isinstance(fmap_size, int) and not isinstance(fmap_size, bool):
        R = C = int(fmap_size)
    else:
        raise TypeError(
            f"relpos_attention: fmap_size={fmap_size!r}; expected an int (square grid) or "
            "a pair of ints (rows, cols)"
        )
    if R < 1 or C < 1:
        raise ValueError(f"relpos_attention: fmap_size=({R}, {C}); expected positive sides")
    return R, C


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"relpos_attention: {name} must be a float, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"relpos_attention: {name}={value}; expected a finite float")
    return value


def _validate(q, k, v, bias_table, fmap_size, q_stride, scale, bias_scale, table_layout):
    for name, t in (("q", q), ("k", k), ("v", v), ("bias_table", bias_table)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"relpos_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"relpos_attention: {name} has dtype {t.dtype}; expected a floating-point tensor "
                "(float16, bfloat16, float32 or float64)"
            )
    if q.ndim != 4:
        raise ValueError(f"relpos_attention: q has shape {_shape(q)}; expected (B, H, Nq, Dk)")
    check_qkv("relpos_attention", q, k, v)
    B, H, Nq, Dk = q.shape
    Nk = k.shape[2]
    devices = {t.device for t in (q, k, v, bias_table)}
    if len(devices) > 1:
        raise ValueError(
            "relpos_attention: q, k, v, bias_table are on different devices ("
            + ", ".join(str(t.device) for t in (q, k, v, bias_table))
            + "); expected one device"
        )
    if table_layout not in _LAYOUTS:
        raise ValueError(
            f"relpos_attention: table_layout={table_layout!r}; expected 'hn' (table (H, R*C)) "
            "or 'nh' (table (R*C, H))"
        )
    R, C = _fmap(fmap_size)
    s = _int("q_stride", q_stride)
    if s < 1:
        raise ValueError(f"relpos_attention: q_stride={s}; expected an int >= 1")
    if Nk != R * C:
        raise ValueError(
            f"relpos_attention: k has Nk={Nk} keys but fmap_size=({R}, {C}) has R*C={R * C} "
            "positions; expected Nk = R*C"
        )
    Rq, Cq = _reference.relpos_query_grid((R, C), s)
    if Nq != Rq * Cq:
        raise ValueError(
            f"relpos_attention: q has Nq={Nq} queries; expected ceil(R/s)*ceil(C/s) = "
            f"{Rq}*{Cq} = {Rq * Cq} for fmap_size=({R}, {C}) and q_stride={s}"
        )
    want = (H, R * C) if table_layout == "hn" else (R * C, H)
    if tuple(bias_table.shape) != want:
        raise ValueError(
            f"relpos_attention: bias_table has shape {_shape(bias_table)}; expected "
            f"{want} (H={H} heads, R*C={R * C} offsets) for table_layout={table_layout!r}"
        )
    scale = Dk**-0.5 if scale is None else _float("scale", scale)
    bias_scale = _float("bias_scale", bias_scale)
    return (R, C), s, scale, bias_scale


def _inputs(
    q: Any,
    k: Any,
    v: Any,
    bias_table: Any,
    *,
    fmap_size: Any,
    q_stride: Any = 1,
    scale: Any = None,
    bias_scale: Any = 1.0,
    table_layout: Any = "hn",
) -> Inputs:
    """The validated call, as dispatch sees it."""
    fmap, s, scale, bias_scale = _validate(
        q, k, v, bias_table, fmap_size, q_stride, scale, bias_scale, table_layout
    )
    return Inputs(
        "relpos_attention",
        {"q": q, "k": k, "v": v, "bias_table": bias_table},
        params=("bias_table",),
        sizes={"Dk": q.shape[-1], "Dv": v.shape[-1], "max(R, C)": max(fmap), "R*C": fmap[0] * fmap[1]},
        kwargs=dict(
            q=q, k=k, v=v, bias_table=bias_table, fmap_size=fmap, q_stride=s, scale=scale,
            bias_scale=bias_scale, table_layout=table_layout,
        ),
    )  # fmt: skip


def relpos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor,
    *,
    fmap_size: int | tuple[int, int],
    q_stride: int = 1,
    scale: float | None = None,
    bias_scale: float = 1.0,
    table_layout: str = "hn",
    backend: str | None = None,
) -> torch.Tensor:
    """LeViT attention with a relative-position bias: softmax(logits) @ v.

    Args:
        q: (B, H, Nq, Dk) queries, Nq = ceil(R/q_stride) * ceil(C/q_stride).
        k: (B, H, Nk, Dk) keys, Nk = R*C.
        v: (B, H, Nk, Dv) values; Dv may differ from Dk.
        bias_table: (H, R*C) for table_layout "hn", (R*C, H) for "nh".
        fmap_size: the key grid (R, C); an int means a square grid. The op
            cannot tell the grid from the shapes: any (R, C) with R*C = Nk is
            accepted (a 4x4 and a 2x8 grid both have 16 keys) and gives another
            answer, so pass the grid the bias table was built for (the modules
            ``optimize`` installs pass their module's own).
        q_stride: query subsampling of the grid (2 for LeViT's shrink attention).
        scale: multiplies q.k; default Dk**-0.5.
        bias_scale: multiplies the table entry (vit-pytorch LeViT uses 1/scale).
        table_layout: "hn" or "nh" (see bias_table).
        backend: force "reference", "torch", "triton" or "cuda"; None picks automatically.

    Returns:
        (B, H, Nq, Dv) in q's dtype.
    """
    tensors = (q, k, v, bias_table)
    key = _DECISIONS.key(backend, tensors, (fmap_size, q_stride, scale, bias_scale, table_layout))
    hit = _DECISIONS.get(key)
    if hit is not None:  # this signature validated and chose hit[0] before
        chosen, checked = hit
        named = dict(zip(_TENSORS, tensors, strict=True))
        inputs = Inputs("relpos_attention", named, params=("bias_table",), kwargs={**named, **checked})
        return chosen.run(inputs)
    inputs = _inputs(
        q, k, v, bias_table, fmap_size=fmap_size, q_stride=q_stride, scale=scale,
        bias_scale=bias_scale, table_layout=table_layout,
    )  # fmt: skip
    chosen = select(BACKENDS, inputs, backend)
    _DECISIONS.put(key, chosen, {n: x for n, x in inputs.kwargs.items() if n not in _TENSORS})
    return chosen.run(inputs)


def which_backend(
    *args: Any, backend: str | None = None, **kwargs: Any
) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """For the arguments of ``relpos_attention``: the backend it would run (None: none
    can) and each backend's reasons to refuse (empty for one that can). Runs nothing."""
    return explain(BACKENDS, _inputs(*args, **kwargs), backend)
