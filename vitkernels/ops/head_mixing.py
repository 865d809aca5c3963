"""head_mixing_attention: attention whose heads are mixed around the softmax (the spec
is ``vitkernels.backends.reference.head_mixing_attention``).

    s = scale * q k^T                          per head h, (B, H, Nq, Nk)
    l[g] = sum_h A[g, h] s[h] + a[g]           pre = (A, a)       talking heads
    p = softmax over the keys of l             (attention dropout: dropout_site "probs")
    r[f] = sum_g P[f, g] p[g] + c[f]           post = (P, c)      talking heads, re-attention
    n = LayerNorm over the heads of r          head_norm = (w, b, eps)   re-attention
    out[f] = n[f] @ v[f]                       (attention dropout: dropout_site "mixed")

One convention for the mixing pairs (weight, bias-or-None): weight is (H, H) as an
nn.Linear(H, H) acting on the head axis holds it, weight[out, in], and bias is (H,)
or None. How the models' parameters map to it:

* timm ``TalkingHeadAttn`` (CaiT): pre = (proj_l.weight, proj_l.bias), post =
  (proj_w.weight, proj_w.bias); its attn_drop follows proj_w: dropout_site "mixed".
* vit-pytorch CaiT ``Attention``: mix_heads_pre_attn / mix_heads_post_attn are used
  as einsum('b h i j, h g -> b g i j', x, W), i.e. W[in, out]: pre = (W_pre.t(), None),
  post = (W_post.t(), None); dropout after the softmax: dropout_site "probs".
* vit-pytorch DeepViT ``Attention`` (re-attention): post = (reattn_weights.t(), None),
  head_norm = (reattn_norm[1].weight, reattn_norm[1].bias, reattn_norm[1].eps);
  dropout after the softmax: dropout_site "probs".

Transposed views are taken as they are (the kernels read any strides), and the
gradient flows back to the original parameter.

Attention dropout: ``dropout_p`` > 0 applies dropout (F.dropout, training
semantics, like SDPA's ``dropout_p``: pass 0 in eval) at ``dropout_site``. The
reference and torch backends do; the Triton kernels have no dropout and refuse
such calls with that reason, so automatic dispatch runs a training step with
attention dropout on the torch backend (materialising the attention maps) and a
forced triton backend raises. The models' default attention dropout is 0.

The pre-mix bias a adds a constant to each whole row of l[g], which the softmax
ignores: the output does not depend on it. The reference and torch backends add
it (autograd gives it a gradient that is 0 up to rounding); the Triton kernels
leave it out and give it an exact zero gradient.

Backends, in automatic priority order: triton (the Triton kernels: every head of a
query block in one program, no (B, H, Nq, Nk) tensor in memory, gradients of q,
k, v and every mixing and norm parameter, the latter summed deterministically;
for H <= 4 heads of Dk, Dv <= 64 with 16-byte aligned rows, the shapes whose
kernels fit a thread's registers: CaiT-XXS's 4 heads of 48; for 5-16 heads
(MAX_FWD_HEADS) a forward and a backward, the head mixing on the tensor cores,
float16 / bfloat16, with or without the head norm, rows of any alignment (CaiT-S's
8 heads, CaiT-M's 16, DeepViT-S's 12 heads of 33: the forward faster than the torch
backend there by the compiler-based estimate, bench/NOTES.md 2026-12-01 tcmix,
tcnorm; the backward: tcbwd)),
torch (batched matrix products on materialised attention maps; the automatic
choice on CPU), reference (the literal einsum math). The triton backend runs
through the custom ops ``vitkernels::head_mixing_attention_fwd`` / ``_bwd`` (fake
impls and autograd registered), so it works under ``torch.compile(fullgraph=True)``
and ``torch.export``; plain eager calls run the same launchers without torch.library,
and a call signature seen before skips validation and backend selection (its
parameters are still this call's: vitkernels/ops/_fastpath.py). For the backward it saves q, k, v, the parameters and the
row logsumexp (B, H, Nq) float32; with 5-16 heads whose Dk or Dv is not a multiple
of 8 (DeepViT-S's 33) also the zero-padded copies of k and v the forward read them
through (B, H, Nk, 48 for 33), so that the backward need not pad them again (~49 us
a layer at DeepViT-S, batch 256, by the compiler-based estimate, for 2 x 58 MB held
until the backward).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vitkernels.backends import reference as _reference
from vitkernels.backends import torch_ops as _torch_ops
from vitkernels.ops._checks import check_qkv
from vitkernels.ops._dispatch import (
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    Backend,
    Inputs,
    explain,
    select,
    triton_import_error,
)
from vitkernels.ops._fastpath import DecisionCache, direct_call_ok, needs_grad

__all__ = ["BACKENDS", "DROPOUT_SITES", "MAX_FWD_HEADS", "MAX_HEADS", "MAX_HEAD_DIM", "head_mixing_attention", "which_backend"]

Mix = tuple[torch.Tensor, torch.Tensor | None]
Norm = tuple[torch.Tensor | None, torch.Tensor | None, float]

DROPOUT_SITES = ("probs", "mixed")

# The Triton kernels keep a query block's tiles of every head, the mixing weights and
# the gradient accumulators in registers; beyond these sizes they spill
# (tests/test_compile_budget.py checks the launches) and the torch backend runs.
MAX_HEADS = 4
MAX_HEAD_DIM = 64
# 5-16 heads: a forward and a backward with the head mixing on the tensor cores
# (vitkernels/triton/head_mixing_tc.py): float16 / bfloat16, the head norm included, any
# row alignment (DeepViT-S's heads of 33)
MAX_FWD_HEADS = 16


# ----------------------------------------------------------------------------
# custom ops (the triton backend)


def _launchers() -> tuple[Any, Any]:
    from vitkernels.triton import head_mixing as tk

    return tk.head_mixing_attention_fwd, tk.head_mixing_attention_bwd


@torch.library.custom_op("vitkernels::head_mixing_attention_fwd", mutates_args=())
def head_mixing_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pre_w: torch.Tensor | None,
    pre_b: torch.Tensor | None,
    post_w: torch.Tensor | None,
    post_b: torch.Tensor | None,
    norm_w: torch.Tensor | None,
    norm_b: torch.Tensor | None,
    scale: float,
    eps: float,
    has_norm: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, Nq, Dv), lse (B, H, Nq) float32, k_copy, v_copy). pre_b only
    receives its (zero) gradient: the output does not depend on it. k_copy, v_copy:
    the zero-padded copies of k and v the forward read them through, saved for the
    backward, where ``_copy_shapes`` says there are (else empty (0,) tensors)."""
    return _forward(q, k, v, pre_w, pre_b, post_w, post_b, norm_w, norm_b, scale, eps, has_norm, backend)


def _forward(q, k, v, pre_w, pre_b, post_w, post_b, norm_w, norm_b, scale, eps, has_norm, backend):
    """The custom op's forward (also run directly by eager calls: ``_Direct``)."""
    if backend != "triton":
        raise ValueError(f"head_mixing_attention: kernel backend {backend!r}; expected 'triton'")
    fwd, _ = _launchers()
    copies: dict[str, torch.Tensor] = {}
    out, lse = fwd(q, k, v, pre_w, post_w, post_b, norm_w, norm_b, scale, eps, has_norm, copies)
    shapes = _copy_shapes(q, k, v)
    if shapes is None:
        return out, lse, q.new_empty((0,)), q.new_empty((0,))
    if "k" not in copies:  # the launcher returned early (no query rows): copies all the same
        if k.shape[0] == 0:
            return out, lse, q.new_empty(shapes[0]), q.new_empty(shapes[1])
        from vitkernels.triton.head_mixing_tc import _pad_kv

        copies["k"], copies["v"] = _pad_kv(k, v, shapes[0][-1], shapes[1][-1])
    return out, lse, copies["k"], copies["v"]


def _copy_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[tuple[int, ...], ...] | None:
    """The forward's saved k / v copies' shapes, or None (``head_mixing_tc.saved_copy_shapes``:
    from shapes and dtype only, the same for fake tensors)."""
    from vitkernels.triton.head_mixing_tc import saved_copy_shapes

    return saved_copy_shapes(q, k, v)


@head_mixing_attention_fwd.register_fake
def _(q, k, v, pre_w, pre_b, post_w, post_b, norm_w, norm_b, scale, eps, has_norm, backend):
    B, H, Nq, _ = q.shape
    shapes = _copy_shapes(q, k, v)
    kc, vc = ((0,), (0,)) if shapes is None else shapes
    return (q.new_empty((B, H, Nq, v.shape[-1])), q.new_empty((B, H, Nq), dtype=torch.float32),
            q.new_empty(kc), q.new_empty(vc))  # fmt: skip


@torch.library.custom_op("vitkernels::head_mixing_attention_bwd", mutates_args=())
def head_mixing_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pre_w: torch.Tensor | None,
    pre_b: torch.Tensor | None,
    post_w: torch.Tensor | None,
    post_b: torch.Tensor | None,
    norm_w: torch.Tensor | None,
    norm_b: torch.Tensor | None,
    lse: torch.Tensor,
    k_copy: torch.Tensor,
    v_copy: torch.Tensor,
    scale: float,
    eps: float,
    has_norm: bool,
    backend: str,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:  # fmt: skip
    """(dq, dk, dv, d_pre_w, d_pre_b, d_post_w, d_post_b, d_norm_w, d_norm_b); an
    empty (0,) tensor for each absent parameter. k_copy, v_copy: the forward's (empty
    (0,) tensors where it kept none)."""
    return _backward_impl(grad_out, q, k, v, pre_w, pre_b, post_w, post_b, norm_w, norm_b, lse, k_copy,
                          v_copy, scale, eps, has_norm, backend)  # fmt: skip


def _backward_impl(grad_out, q, k, v, pre_w, pre_b, post_w, post_b, norm_w, norm_b, lse, k_copy, v_copy,
                   scale, eps, has_norm, backend):  # fmt: skip
    """The custom op's backward (also run directly by eager calls)."""
    _, bwd = _launchers()
    copies = (k_copy, v_copy) if k_copy.dim() == 4 else None
    dq, dk, dv, dpw, dpow, dpob, dnw, dnb = bwd(
        grad_out, q, k, v, pre_w, post_w, post_b, norm_w, norm_b, lse, scale, eps, has_norm, copies
    )
    dpb = None if pre_b is None else torch.zeros_like(pre_b)
    grads = (dpw, dpb, dpow, dpob, dnw, dnb)
    return dq, dk, dv, *(q.new_empty((0,)) if g is None else g for g in grads)


def _param_grads_like(params, has_norm: bool) -> list[bool]:
    pre_w, pre_b, post_w, post_b, norm_w, norm_b = params
    return [
        pre_w is not None, pre_b is not None, post_w is not None, post_b is not None,
        has_norm and norm_w is not None, has_norm and norm_b is not None,
    ]  # fmt: skip


@head_mixing_attention_bwd.register_fake
def _(grad_out, q, k, v, pre_w, pre_b, post_w, post_b, norm_w, norm_b, lse, k_copy, v_copy, scale, eps,
      has_norm, backend):  # fmt: skip
    params = (pre_w, pre_b, post_w, post_b, norm_w, norm_b)
    present = _param_grads_like(params, has_norm)
    grads = [t.new_empty(t.shape) if ok else q.new_empty((0,)) for t, ok in zip(params, present, strict=True)]
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape), *grads


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, pre_w, pre_b, post_w, post_b, norm_w, norm_b, scale, eps, has_norm, backend = inputs
    _, lse, k_copy, v_copy = output
    ctx.save_for_backward(q, k, v, pre_w, pre_b, post_w, post_b, norm_w, norm_b, lse, k_copy, v_copy)
    ctx.args = (scale, eps, has_norm, backend)
    ctx.mark_non_differentiable(lse, k_copy, v_copy)


def _backward(ctx, grad_out, _grad_lse, _grad_k_copy, _grad_v_copy):
    q, k, v, pre_w, pre_b, post_w, post_b, norm_w, norm_b, lse, k_copy, v_copy = ctx.saved_tensors
    params = (pre_w, pre_b, post_w, post_b, norm_w, norm_b)
    saved = (grad_out, q, k, v, *params, lse, k_copy, v_copy)
    if direct_call_ok(saved):  # eager: the launcher itself (vitkernels/ops/_fastpath.py)
        grads = _backward_impl(*saved, *ctx.args)
    else:
        grads = head_mixing_attention_bwd(*saved, *ctx.args)
    present = [True, True, True, *_param_grads_like(params, ctx.args[2])]
    need = ctx.needs_input_grad
    out = [g if ok and need[i] else None for i, (g, ok) in enumerate(zip(grads, present, strict=True))]
    return (*out, None, None, None, None)


head_mixing_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The custom op's forward and backward without torch.library, for eager calls
    that ``direct_call_ok`` admits: the same launchers, saved tensors and gradients."""

    @staticmethod
    def forward(ctx, *args):  # the custom op's arguments, backend last
        outs = _forward(*args)
        _setup_context(ctx, args, outs)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def _unpack(pre: Mix | None, post: Mix | None, head_norm: Norm | None) -> tuple:
    pre_w, pre_b = (None, None) if pre is None else pre
    post_w, post_b = (None, None) if post is None else post
    norm_w, norm_b, eps = (None, None, 0.0) if head_norm is None else head_norm
    return pre_w, pre_b, post_w, post_b, norm_w, norm_b, float(eps)


# ----------------------------------------------------------------------------
# backends: capabilities as data (checked by Backend.not_supported_reasons), and the
# kernels' own envelope (tk.supports) and dropout


def _params(pre: Mix | None, post: Mix | None, head_norm: Norm | None) -> dict[str, torch.Tensor | None]:
    pre_w, pre_b, post_w, post_b, norm_w, norm_b, _ = _unpack(pre, post, head_norm)
    return {
        "pre weight": pre_w, "pre bias": pre_b, "post weight": post_w, "post bias": post_b,
        "head_norm weight": norm_w, "head_norm bias": norm_b,
    }  # fmt: skip


def _many_heads_reasons(inputs: Inputs) -> list[str]:
    """Why the 5-16-head kernels (head_mixing_tc.py: forward and backward) do not take
    these inputs."""
    kw = inputs.kwargs
    H = kw["q"].shape[1]
    if not MAX_HEADS < H <= MAX_FWD_HEADS:
        return []
    if kw["q"].dtype not in (torch.float16, torch.bfloat16):
        return [f"H={H}: with more than {MAX_HEADS} heads the kernels (the head mixing on tensor cores) take "
                f"float16 and bfloat16 inputs; q has dtype {_dtype(kw['q'])}"]
    return []


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda",)
    interpreter = True
    auto_on_cpu = False
    dtypes = KERNEL_DTYPES
    min_compute_capability = (8, 0)
    max_sizes = {"H": MAX_FWD_HEADS, "Dk": MAX_HEAD_DIM, "Dv": MAX_HEAD_DIM}
    requirements = (triton_import_error,)

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if triton_import_error() is not None:
            return reasons
        from vitkernels.triton import head_mixing as tk

        kw = inputs.kwargs
        if kw["q"].shape[1] <= MAX_HEADS:  # the 5-16-head kernels read any alignment (masked loads, padded copies)
            reasons += tk.supports(kw["q"], kw["k"], kw["v"])
        reasons += _many_heads_reasons(inputs)
        if kw["dropout_p"] > 0:
            reasons.append(
                f"dropout_p={kw['dropout_p']}: the kernels have no attention dropout (the torch "
                "backend has; in eval, or with the attention dropout at 0, they apply)"
            )
        return reasons

    def run(self, inputs: Inputs) -> torch.Tensor:
        kw = inputs.kwargs
        pre_w, pre_b, post_w, post_b, norm_w, norm_b, eps = _unpack(kw["pre"], kw["post"], kw["head_norm"])
        has_norm = kw["head_norm"] is not None
        tensors = (kw["q"], kw["k"], kw["v"], pre_w, pre_b, post_w, post_b, norm_w, norm_b)
        args = (*tensors, kw["scale"], eps, has_norm, "triton")
        if not direct_call_ok(tensors):  # compiling, tracing, a mode or a subclass
            return head_mixing_attention_fwd(*args)[0]
        if needs_grad(tensors):
            return _Direct.apply(*args)[0]
        q, k, v = tensors[:3]
        fwd, _ = _launchers()
        return fwd(q, k, v, pre_w, post_w, post_b, norm_w, norm_b, kw["scale"], eps, has_norm, {})[0]


class TorchBackend(Backend):
    name = "torch"
    dtypes = FLOAT_DTYPES

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _torch_ops.head_mixing_attention(**inputs.kwargs)


class ReferenceBackend(Backend):
    name = "reference"

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _reference.head_mixing_attention(**inputs.kwargs)


BACKENDS: list[Backend] = [TritonBackend(), TorchBackend(), ReferenceBackend()]
_DECISIONS = DecisionCache("head_mixing_attention", BACKENDS)


# ----------------------------------------------------------------------------
# public function


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"head_mixing_attention: {name} must be a float, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"head_mixing_attention: {name}={value}; expected a finite float")
    return value


def _tensor(name: str, t: Any, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"head_mixing_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"head_mixing_attention: {name} has dtype {t.dtype}; expected a floating-point tensor "
            "(float16, bfloat16, float32 or float64)"
        )
    if t.device != device:
        raise ValueError(
            f"head_mixing_attention: {name} is on {t.device} but q is on {device}; "
            "expected every tensor on q's device"
        )
    return t


_MIX_HINT = {
    "pre": "pre = (A, a) mixes the logits before the softmax",
    "post": "post = (P, c) mixes the probabilities after the softmax",
}


def _mix(name: str, pair: Any, H: int, device: torch.device) -> Mix | None:
    if pair is None:
        return None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(
            f"head_mixing_attention: {name}={type(pair).__name__}; expected a (weight, bias) pair "
            f"with bias None allowed ({_MIX_HINT[name]})"
        )
    w, b = pair
    w = _tensor(f"{name} weight", w, device)
    if tuple(w.shape) != (H, H):
        raise ValueError(
            f"head_mixing_attention: {name} weight has shape {_shape(w)}; expected (H, H) = "
            f"({H}, {H}) for q with H={H} heads (nn.Linear's convention weight[out, in]; pass "
            "a parameter used as einsum('b h i j, h g -> b g i j') transposed, W.t())"
        )
    if b is not None:
        b = _tensor(f"{name} bias", b, device)
        if tuple(b.shape) != (H,):
            raise ValueError(
                f"head_mixing_attention: {name} bias has shape {_shape(b)}; expected (H,) = ({H},) "
                f"for q with H={H} heads, or None"
            )
    return w, b


def _norm(head_norm: Any, H: int, device: torch.device) -> Norm | None:
    if head_norm is None:
        return None
    if not isinstance(head_norm, (tuple, list)) or len(head_norm) != 3:
        raise TypeError(
            f"head_mixing_attention: head_norm={type(head_norm).__name__}; expected a (weight, "
            "bias, eps) triple (weight and bias (H,) or None), e.g. (ln.weight, ln.bias, ln.eps) "
            "of an nn.LayerNorm(H)"
        )
    w, b, eps = head_norm
    parts = []
    for part, t in (("weight", w), ("bias", b)):
        if t is not None:
            t = _tensor(f"head_norm {part}", t, device)
            if tuple(t.shape) != (H,):
                raise ValueError(
                    f"head_mixing_attention: head_norm {part} has shape {_shape(t)}; expected "
                    f"(H,) = ({H},) for q with H={H} heads (the norm runs over the head axis)"
                )
        parts.append(t)
    eps = _float("head_norm eps", eps)
    if eps < 0:
        raise ValueError(f"head_mixing_attention: head_norm eps={eps}; expected eps >= 0")
    return parts[0], parts[1], eps


def _validate(q, k, v, scale, pre, post, head_norm, dropout_p, dropout_site):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"head_mixing_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 4:
        raise ValueError(f"head_mixing_attention: q has shape {_shape(q)}; expected (B, H, Nq, Dk)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t, q.device)
    check_qkv("head_mixing_attention", q, k, v)
    H, Dk = q.shape[1], q.shape[3]
    pre = _mix("pre", pre, H, q.device)
    post = _mix("post", post, H, q.device)
    head_norm = _norm(head_norm, H, q.device)
    scale = Dk**-0.5 if scale is None else _float("scale", scale)
    dropout_p = _float("dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"head_mixing_attention: dropout_p={dropout_p}; expected 0 <= dropout_p <= 1")
    if dropout_site not in DROPOUT_SITES:
        raise ValueError(
            f"head_mixing_attention: dropout_site={dropout_site!r}; expected 'probs' (after the "
            "softmax, before the post-mix: vit-pytorch) or 'mixed' (on the final mixed "
            "probabilities, before @ v: timm)"
        )
    return scale, pre, post, head_norm, dropout_p


def _inputs(
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: Any = None,
    pre: Any = None,
    post: Any = None,
    head_norm: Any = None,
    dropout_p: Any = 0.0,
    dropout_site: Any = "probs",
) -> Inputs:
    """The validated call, as dispatch sees it."""
    scale, pre, post, head_norm, dropout_p = _validate(
        q, k, v, scale, pre, post, head_norm, dropout_p, dropout_site
    )
    params = _params(pre, post, head_norm)
    Nq, Nk = q.shape[2], k.shape[2]
    return Inputs(
        "head_mixing_attention",
        {"q": q, "k": k, "v": v, **params},
        params=tuple(params),
        sizes={"H": q.shape[1], "Nq": Nq, "Nk": Nk, "Dk": q.shape[3], "Dv": v.shape[3]},
        kwargs=dict(
            q=q, k=k, v=v, scale=scale, pre=pre, post=post, head_norm=head_norm,
            dropout_p=dropout_p, dropout_site=dropout_site,
        ),
    )  # fmt: skip


def head_mixing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    pre: Mix | None = None,
    post: Mix | None = None,
    head_norm: Norm | None = None,
    dropout_p: float = 0.0,
    dropout_site: str = "probs",
    backend: str | None = None,
) -> torch.Tensor:
    """Attention with heads mixed before and/or after the softmax (talking heads,
    re-attention); see the module docstring for the math and the conventions.

    Args:
        q: (B, H, Nq, Dk) queries, any strides.
        k: (B, H, Nk, Dk) keys.
        v: (B, H, Nk, Dv) values; Dv may differ from Dk.
        scale: multiplies q.k (applied to q before the product); default Dk**-0.5.
        pre: (weight (H, H), bias (H,) or None) mixing the logits across heads,
            mixed[g] = sum_h weight[g, h] logits[h] + bias[g]; None skips it.
        post: (weight, bias) mixing the softmax probabilities the same way.
        head_norm: (weight (H,) or None, bias (H,) or None, eps): LayerNorm over the
            head axis of the mixed probabilities at each (query, key).
        dropout_p: attention dropout probability (training semantics; pass 0 in eval).
        dropout_site: "probs" (after the softmax) or "mixed" (before @ v).
        backend: force "reference", "torch" or "triton"; None picks automatically.

    Returns:
        (B, H, Nq, Dv) in q's dtype.
    """
    key = _decision_key(backend, q, k, v, scale, pre, post, head_norm, dropout_p, dropout_site)
    hit = _DECISIONS.get(key)
    if hit is not None:  # this signature validated and chose hit[0] before
        chosen, (scale, eps, dropout_p) = hit
        # the parameters are this call's (only their checked properties were kept)
        pre = None if pre is None else (pre[0], pre[1])
        post = None if post is None else (post[0], post[1])
        head_norm = None if head_norm is None else (head_norm[0], head_norm[1], eps)
        params = _params(pre, post, head_norm)
        inputs = Inputs("head_mixing_attention", {"q": q, "k": k, "v": v, **params}, params=tuple(params),
                        kwargs=dict(q=q, k=k, v=v, scale=scale, pre=pre, post=post, head_norm=head_norm,
                                    dropout_p=dropout_p, dropout_site=dropout_site))  # fmt: skip
        return chosen.run(inputs)
    inputs = _inputs(
        q, k, v, scale=scale, pre=pre, post=post, head_norm=head_norm, dropout_p=dropout_p,
        dropout_site=dropout_site,
    )  # fmt: skip
    chosen = select(BACKENDS, inputs, backend)
    kw = inputs.kwargs
    eps = kw["head_norm"][2] if kw["head_norm"] is not None else 0.0
    _DECISIONS.put(key, chosen, (kw["scale"], eps, kw["dropout_p"]))
    return chosen.run(inputs)


def _decision_key(backend, q, k, v, scale, pre, post, head_norm, dropout_p, dropout_site):
    """The decision cache's key of a call (None: take the checked path): every tensor's
    properties (parameters included), each input's start alignment (the kernels' refusal
    of unaligned rows reads it), and the other arguments as given."""
    if torch.compiler.is_compiling():  # dispatch is traced as plain Python (and offsets are not)
        return None
    tensors: list[Any] = [q, k, v]
    layout: list[Any] = []
    for part, n in ((pre, 2), (post, 2), (head_norm, 3)):
        if part is None:
            layout.append(None)
            continue
        if type(part) not in (tuple, list) or len(part) != n:
            return None  # the checked path says what is wrong with it
        tensors += part[:2]
        layout.append((type(part).__name__, part[2] if n == 3 else None))
    try:
        offsets = tuple(t.storage_offset() * t.element_size() % 16 for t in (q, k, v))
    except (AttributeError, RuntimeError, TypeError):
        return None
    return _DECISIONS.key(backend, tensors, (scale, dropout_p, dropout_site, offsets, *layout))


def which_backend(
    *args: Any, backend: str | None = None, **kwargs: Any
) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """For the arguments of ``head_mixing_attention``: the backend it would run (None:
    none can) and each backend's reasons to refuse (empty for one that can). Runs nothing."""
    return explain(BACKENDS, _inputs(*args, **kwargs), backend)
