"""performer_attention: T2T-ViT's Performer single attention (official Token_performer).

    phi(x) = exp(x @ w.T - |x|^2 / 2) / sqrt(M)
    y = phi(q) @ (phi(k).T @ v) / (phi(q) @ sum_t phi(k) + eps)

q, k, v (B, T, E) with any strides (views of one kqv projection), w (M, E) fixed
random features. The math is float32 whatever the input dtype (float64 stays
float64 on the reference and torch backends); the result has q's dtype.

Backends, in automatic priority order: cuda (the compiled extension, where the speed
evidence says it is at least as fast as triton: vitkernels/evidence.py), triton
(not for the E a GPU computed wrongly: see REFUSE_WRONG_E_ON_GPU), torch (a stable stock-PyTorch composite, the automatic choice on CPU), reference
(the literal formula). The triton and cuda backends run through the custom ops
``vitkernels::performer_attention_fwd`` / ``_bwd`` (fake impls and autograd
registered), so they work under ``torch.compile(fullgraph=True)``; plain eager calls
run the same launchers without torch.library (vitkernels/ops/_fastpath.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vitkernels import cuda as _cuda
from vitkernels.backends import reference as _reference
from vitkernels.backends import torch_ops as _torch_ops
from vitkernels.ops._dispatch import (
    FLOAT_DTYPES,
    HALF,
    KERNEL_DTYPES,
    Backend,
    Inputs,
    explain,
    select,
    triton_import_error,
)
from vitkernels.ops._fastpath import DecisionCache, direct_call_ok, needs_grad

__all__ = ["BACKENDS", "MAX_E", "MAX_M", "performer_attention", "which_backend"]

# The kernels (triton, and the CUDA extension that mirrors them) keep (M, E) tiles
# of statistics in registers; larger sizes spill (tests/test_compile_budget.py checks
# the launches for spills) and run on the torch backend instead.
MAX_E = 64
MAX_M = 32

# The compiled Triton kernels gave a WRONG result on a GPU where the Triton interpreter
# (the CPU tests) gives the right one (H200, triton 3.6, 2026-12-04, bench/NOTES.md):
# the forward at B1 T4096 M17, float16 and bfloat16, relative error 0.7-0.9 against
# float64 at E 33, 34 and 40 (and an illegal address at E 33 M 16); right at E 20, 32,
# 48 and 64, and in float32 at E 33. The key statistics' kernel (performer_fwd_kv) is
# the wrong one, where E is not a multiple of 16 and its tiles are 64 wide (32 < E <
# 64). Until a GPU run shows a fix, the triton backend refuses those E, and odd E (the
# first failing case; odd E <= 32 never ran on a GPU), on CUDA tensors; dispatch runs
# them elsewhere (no model uses one: T2T-ViT's E is 64). bench/ima_probe.py sets this
# False to run the kernels there on purpose.
REFUSE_WRONG_E_ON_GPU = True


def gpu_wrong_e(E: int) -> bool:
    """Whether the triton backend's compiled kernels are refused at this E on a GPU
    (REFUSE_WRONG_E_ON_GPU)."""
    return E % 2 == 1 or (32 < E < 64 and E % 16 != 0)

# ----------------------------------------------------------------------------
# custom ops (the triton and cuda backends)


def _launchers(backend: str) -> tuple[Any, Any]:
    if backend == "cuda":
        return _cuda.op("performer_attention_fwd"), _cuda.op("performer_attention_bwd")
    if backend == "triton":
        from vitkernels.triton import performer as tk

        return tk.performer_attention_fwd, tk.performer_attention_bwd
    raise ValueError(f"performer_attention: kernel backend {backend!r}; expected 'triton' or 'cuda'")


@torch.library.custom_op("vitkernels::performer_attention_fwd", mutates_args=())
def performer_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, lks, vbar): the result and the key statistics the backward reuses."""
    fwd, _ = _launchers(backend)
    y, lks, vbar = fwd(q, k, v, w, eps)
    return y, lks, vbar


@performer_attention_fwd.register_fake
def _(q, k, v, w, eps, backend):
    B, T, E = q.shape
    M = w.shape[0]
    return (
        q.new_empty((B, T, E)),
        q.new_empty((B, M), dtype=torch.float32),
        q.new_empty((B, M, E), dtype=torch.float32),
    )


@torch.library.custom_op("vitkernels::performer_attention_bwd", mutates_args=())
def performer_attention_bwd(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    lks: torch.Tensor,
    vbar: torch.Tensor,
    eps: float,
    w_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dw); dw is zeros unless w_grad."""
    _, bwd = _launchers(backend)
    dq, dk, dv, dw = bwd(dy, q, k, v, w, lks, vbar, eps, w_grad)
    return dq, dk, dv, dw


@performer_attention_bwd.register_fake
def _(dy, q, k, v, w, lks, vbar, eps, w_grad, backend):
    shape = tuple(q.shape)
    return q.new_empty(shape), q.new_empty(shape), q.new_empty(shape), w.new_empty(w.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, w, eps, backend = inputs
    _, lks, vbar = output
    ctx.save_for_backward(q, k, v, w, lks, vbar)
    ctx.eps = eps
    ctx.backend = backend
    ctx.mark_non_differentiable(lks, vbar)


def _backward(ctx, dy, _dlks, _dvbar):
    q, k, v, w, lks, vbar = ctx.saved_tensors
    w_grad = bool(ctx.needs_input_grad[3])
    saved = (dy, q, k, v, w, lks, vbar)
    if direct_call_ok(saved):  # eager: the launcher itself (vitkernels/ops/_fastpath.py)
        dq, dk, dv, dw = _launchers(ctx.backend)[1](*saved, ctx.eps, w_grad)
    else:
        dq, dk, dv, dw = performer_attention_bwd(*saved, ctx.eps, w_grad, ctx.backend)
    return dq, dk, dv, (dw if w_grad else None), None, None


class _Direct(torch.autograd.Function):
    """The custom op's forward and backward without torch.library, for eager calls
    that ``direct_call_ok`` admits: the same launchers, saved tensors and gradients."""

    @staticmethod
    def forward(ctx, *args):  # the custom op's arguments, backend last
        y, lks, vbar = _launchers(args[-1])[0](*args[:-1])
        _setup_context(ctx, args, (y, lks, vbar))
        return y, lks, vbar

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dlks, dvbar):
        return _backward(ctx, dy, dlks, dvbar)


performer_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# backends: capabilities as data (checked by Backend.not_supported_reasons)


def _run_kernel(backend: str, inputs: Inputs) -> torch.Tensor:
    kw = inputs.kwargs
    tensors = (kw["q"], kw["k"], kw["v"], kw["w"])
    if not direct_call_ok(tensors):
        return performer_attention_fwd(*tensors, kw["eps"], backend)[0]
    if needs_grad(tensors):
        return _Direct.apply(*tensors, kw["eps"], backend)[0]
    return _launchers(backend)[0](*tensors, kw["eps"])[0]


def _extension_ops() -> str | None:
    reason = _cuda.unavailable_reason()
    if reason is None and not (
        _cuda.has_op("performer_attention_fwd") and _cuda.has_op("performer_attention_bwd")
    ):
        reason = "the CUDA extension has no performer_attention_fwd/_bwd ops"
    return reason


class CudaBackend(Backend):
    name = "cuda"
    auto_if_faster_than = "triton"  # automatically only where the evidence says so
    devices = ("cuda",)
    auto_on_cpu = False
    dtypes = HALF  # q, k, v
    param_dtypes = KERNEL_DTYPES  # w
    min_compute_capability = (8, 0)
    max_sizes = {"E": MAX_E, "M": MAX_M}
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
    max_sizes = {"E": MAX_E, "M": MAX_M}
    requirements = (triton_import_error,)

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        E = inputs.sizes.get("E")
        if REFUSE_WRONG_E_ON_GPU and inputs.device.type == "cuda" and E is not None and gpu_wrong_e(E):
            reasons.append(
                f"E={E}: on a GPU the compiled kernels gave wrong results at E 33, 34 and 40 "
                "(H200, 2026-12-04; right in the Triton interpreter and at E 20, 32, 48, 64), "
                "so an odd E, or one between 32 and 64 that is not a multiple of 16, runs on "
                "another backend until a fix is shown on a GPU"
            )
        return reasons

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _run_kernel("triton", inputs)


class TorchBackend(Backend):
    name = "torch"
    dtypes = FLOAT_DTYPES

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _torch_ops.performer_attention(**inputs.kwargs)


class ReferenceBackend(Backend):
    name = "reference"

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _reference.performer_attention(**inputs.kwargs)


BACKENDS: list[Backend] = [CudaBackend(), TritonBackend(), TorchBackend(), ReferenceBackend()]
_DECISIONS = DecisionCache("performer_attention", BACKENDS)
_TENSORS = ("q", "k", "v", "w")


# ----------------------------------------------------------------------------
# public function


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _validate(q: Any, k: Any, v: Any, w: Any, eps: Any) -> float:
    for name, t in (("q", q), ("k", k), ("v", v), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"performer_attention: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
        if not t.is_floating_point():
            raise TypeError(
                f"performer_attention: {name} has dtype {t.dtype}; expected a floating-point "
                "tensor (float16, bfloat16, float32 or float64)"
            )
    if q.ndim != 3:
        raise ValueError(f"performer_attention: q has shape {_shape(q)}; expected (B, T, E)")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"performer_attention: {name} has shape {_shape(t)}; expected q's shape {_shape(q)}"
            )
    B, T, E = q.shape
    if w.ndim != 2 or w.shape[1] != E:
        raise ValueError(
            f"performer_attention: w has shape {_shape(w)}; expected (M, E) with E={E} (q's last dim)"
        )
    if T < 1 or E < 1 or w.shape[0] < 1:
        raise ValueError(
            f"performer_attention: sizes T={T}, E={E}, M={w.shape[0]}; expected each >= 1"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(
                f"performer_attention: {name} has dtype {t.dtype} but q has {q.dtype}; "
                "expected q, k, v of one dtype"
            )
    devices = {t.device for t in (q, k, v, w)}
    if len(devices) > 1:
        raise ValueError(
            "performer_attention: q, k, v, w are on different devices "
            f"({', '.join(str(t.device) for t in (q, k, v, w))}); expected one device"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"performer_attention: eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"performer_attention: eps={eps}; expected a finite float >= 0")
    return eps


def _inputs(q: Any, k: Any, v: Any, w: Any, *, eps: Any = 1e-8) -> Inputs:
    """The validated call, as dispatch sees it."""
    eps = _validate(q, k, v, w, eps)
    return Inputs(
        "performer_attention",
        {"q": q, "k": k, "v": v, "w": w},
        params=("w",),
        sizes={"E": q.shape[-1], "M": w.shape[0]},
        kwargs=dict(q=q, k=k, v=v, w=w, eps=eps),
    )


def performer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    *,
    eps: float = 1e-8,
    backend: str | None = None,
) -> torch.Tensor:
    """T2T-ViT's Performer single attention.

    Args:
        q, k, v: (B, T, E), one floating dtype, any strides (e.g. the k, q, v
            views of one kqv Linear output).
        w: (M, E) random features (the official Token_performer's ``w``).
        eps: added to the normaliser, >= 0 (the official ``epsilon``).
        backend: force "reference", "torch", "triton" or "cuda"; None picks
            automatically (see ``vitkernels.use_backend``).

    Returns:
        y (B, T, E) in q's dtype: phi(q) (phi(k)^T v) / (phi(q) sum_t phi(k) + eps)
        with phi(x) = exp(x w^T - |x|^2 / 2) / sqrt(M). Differentiable in q, k, v
        and w.
    """
    tensors = (q, k, v, w)
    key = _DECISIONS.key(backend, tensors, (eps,))
    hit = _DECISIONS.get(key)
    if hit is not None:  # this signature validated and chose hit[0] before
        chosen, checked = hit
        named = dict(zip(_TENSORS, tensors, strict=True))
        return chosen.run(Inputs("performer_attention", named, params=("w",), kwargs={**named, **checked}))
    inputs = _inputs(q, k, v, w, eps=eps)
    chosen = select(BACKENDS, inputs, backend)
    _DECISIONS.put(key, chosen, {"eps": inputs.kwargs["eps"]})
    return chosen.run(inputs)


def which_backend(
    *args: Any, backend: str | None = None, **kwargs: Any
) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """For the arguments of ``performer_attention``: the backend it would run (None:
    none can) and each backend's reasons to refuse (empty for one that can). Runs nothing."""
    return explain(BACKENDS, _inputs(*args, **kwargs), backend)
