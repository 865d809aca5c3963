"""patch_embed: convolution as GEMM, without materialising the unfolded patches.

    tokens = out_norm(in_norm(unfold(images)) @ weight.T + bias)        # (B, L, D)
    out = cat(cls_token, tokens) + pos_embed                            # (B, P + L, D)

Covers ViT/DeiT/CaiT/DeepViT/CrossViT patchify (vit-pytorch's Rearrange +
LayerNorm + Linear + LayerNorm, patch_order "pqc"; timm's Conv2d, "cpq"), PiT's
overlapping unfold and T2T's soft split (unfold 7/4/2 + LayerNorm + projection).
Kernel size, stride and padding are those of nn.Unfold / Conv2d (zero padding,
counted in the input norm's statistics like F.unfold's zeros). The reference
backend (vitkernels/backends/reference.py) is the specification.

Backends, in automatic priority order: cuda (the compiled extension, where the speed
evidence says it is at least as fast as triton: vitkernels/evidence.py), triton,
torch (Conv2d, or unfold + layer_norm + linear with an input norm: the automatic
choice on CPU), reference (the literal formula). The triton and cuda backends
run through the custom ops ``vitkernels::patch_embed_fwd`` / ``_bwd`` (fake
impls and autograd registered), so they work under torch.compile(fullgraph=True)
(plain eager calls run the same launchers without torch.library, ops/_fastpath.py);
their backward kernels give the gradients for weight, bias, both norms, pos_embed
and cls_token; the images' gradient (T2T-ViT's later soft splits take token maps
that need one) is computed with stock ops in float32 (unfold recomputed, fold).
The CUDA extension provides the forward only; the cuda backend's backward is the
Triton one. When a gradient will follow (grad mode on, an input requiring one) the
forward also writes what the backward reads (the op's extra outputs: the
pre-output-norm tokens, the norms' row statistics, the weight in Triton's kernel patch
order): the triton forward as ``patch_embed_fwd_saving``, the cuda one
(``patch_embed_fwd_saving`` of the extension) into buffers laid out by Triton's
``saved_layout``, so the backward cannot tell which forward saved them; the
inference forward writes none (the backward launcher recomputes what is missing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

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

__all__ = ["BACKENDS", "patch_embed", "patch_grid", "which_backend"]

Norm = tuple[torch.Tensor | None, torch.Tensor | None, float]

_ORDERS = ("cpq", "pqc")


# ----------------------------------------------------------------------------
# custom ops (the triton and cuda backends)


def _launchers(backend: str) -> tuple[Any, Any]:
    """(fwd, bwd) launchers. The CUDA extension has the forward only (csrc/bindings.cpp):
    the cuda backend's backward is the Triton one (the same contract). The saving
    forwards: ``_saving_launcher``."""
    from vitkernels.triton import patch_embed as tk

    if backend == "cuda":
        return _cuda.op("patch_embed_fwd"), tk.patch_embed_bwd
    if backend == "triton":
        return tk.patch_embed_fwd, tk.patch_embed_bwd
    raise ValueError(f"patch_embed: kernel backend {backend!r}; expected 'triton' or 'cuda'")


Saved = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _empty_saved(images: torch.Tensor) -> Saved:
    return tuple(images.new_empty((0,)) for _ in range(4))  # type: ignore[return-value]


def _saved_buffers(args: tuple) -> Saved:
    """Uninitialised buffers for what the backward reads, laid out as Triton's saving
    forward lays them out (``saved_layout``); empty (0,) tensors where it saves nothing."""
    from vitkernels.triton import patch_embed as tk

    images, weight = args[0], args[1]
    layout = tk.saved_layout(images, weight, *args[9:13], args[15], args[16])
    return tuple(
        images.new_empty((0,)) if spec is None else images.new_empty_strided(spec[0], spec[1], dtype=spec[2])
        for spec in layout
    )  # type: ignore[return-value]


def _cuda_forward_saving(*args) -> tuple[torch.Tensor, ...]:
    """The extension's forward that also writes what the backward reads, into
    ``_saved_buffers``: (out, y, stats, ostats, w_plain) as Triton's saving forward."""
    saved = _saved_buffers(args)
    return (_cuda.op("patch_embed_fwd_saving")(*args, *saved), *saved)


def _saving_launcher(backend: str) -> Any:
    """The forward that also returns what the backward reads: (out, y, stats, ostats, w_plain)."""
    if backend == "cuda":
        return _cuda_forward_saving
    if backend == "triton":
        from vitkernels.triton import patch_embed as tk

        return tk.patch_embed_fwd_saving
    raise ValueError(f"patch_embed: kernel backend {backend!r}; expected 'triton' or 'cuda'")


def _run_forward(backend: str, args: tuple, save: bool) -> tuple[torch.Tensor, ...]:
    """(out, y, stats, ostats, w_plain): the tokens and, with save, what the backward
    reads (vitkernels/triton/patch_embed.py, ``saved_layout``; the same for both
    backends); empty (0,) tensors where the forward saves nothing (no gradient needed)."""
    if save:
        return tuple(_saving_launcher(backend)(*args))
    return (_launchers(backend)[0](*args), *_empty_saved(args[0]))


@torch.library.custom_op("vitkernels::patch_embed_fwd", mutates_args=())
def patch_embed_fwd(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_weight: torch.Tensor | None,
    in_bias: torch.Tensor | None,
    out_weight: torch.Tensor | None,
    out_bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    patch_order: str,
    in_eps: float,
    out_eps: float,
    has_in_norm: bool,
    has_out_norm: bool,
    save: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (B, P + L, D), y, stats, ostats, w_plain); arguments as the launcher
    contract in vitkernels/triton/patch_embed.py (weight (D, K), pos (T, D), cls (P, D));
    save: write what the backward reads (``_run_forward``)."""
    args = (
        images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token,
        kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm, has_out_norm,
    )  # fmt: skip
    return _run_forward(backend, args, save)  # type: ignore[return-value]


@patch_embed_fwd.register_fake
def _(images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token,
      kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm, has_out_norm,
      save, backend):
    B, _, H, W = images.shape
    Ho, Wo = patch_grid((H, W), kernel_size, stride, padding)
    P = 0 if cls_token is None else cls_token.shape[0]
    out = images.new_empty((B, P + Ho * Wo, weight.shape[0]))
    if not save:
        return (out, *_empty_saved(images))
    return (out, *_saved_buffers((
        images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token,
        kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm, has_out_norm,
    )))  # fmt: skip


@torch.library.custom_op("vitkernels::patch_embed_bwd", mutates_args=())
def patch_embed_bwd(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_weight: torch.Tensor | None,
    in_bias: torch.Tensor | None,
    out_weight: torch.Tensor | None,
    out_bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    patch_order: str,
    in_eps: float,
    out_eps: float,
    has_in_norm: bool,
    has_out_norm: bool,
    grad_mask: list[bool],
    y: torch.Tensor,
    stats: torch.Tensor,
    ostats: torch.Tensor,
    w_plain: torch.Tensor,
    backend: str,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:
    """(d_weight, d_bias, d_in_weight, d_in_bias, d_out_weight, d_out_bias, d_pos, d_cls);
    an empty (0,) tensor for each one not asked for (grad_mask) or absent. y, stats,
    ostats, w_plain: what the forward saved (empty: recomputed)."""
    _, bwd = _launchers(backend)
    return tuple(
        bwd(
            grad_out, images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed,
            cls_token, kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm,
            has_out_norm, grad_mask, (y, stats, ostats, w_plain),
        )
    )


def _grad_present(params, has_in_norm: bool, has_out_norm: bool) -> list[bool]:
    weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token = params
    return [
        True, bias is not None,
        has_in_norm and in_weight is not None, has_in_norm and in_bias is not None,
        has_out_norm and out_weight is not None, has_out_norm and out_bias is not None,
        pos_embed is not None, cls_token is not None,
    ]


@patch_embed_bwd.register_fake
def _(grad_out, images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed,
      cls_token, kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm,
      has_out_norm, grad_mask, y, stats, ostats, w_plain, backend):
    params = (weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token)
    present = _grad_present(params, has_in_norm, has_out_norm)
    return tuple(
        t.new_empty(t.shape) if want and ok else images.new_empty((0,))
        for t, want, ok in zip(params, grad_mask, present, strict=True)
    )


def _save(ctx, inputs, saved) -> None:
    """What the backward reads: the tensor inputs, the forward's saved tensors (y, stats,
    ostats, w_plain; empty where it saved nothing), the geometry and the norms."""
    (images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token,
     kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm, has_out_norm,
     _flag, backend) = inputs
    ctx.save_for_backward(images, weight, bias, in_weight, in_bias, out_weight, out_bias,
                          pos_embed, cls_token, *saved)
    ctx.geometry = (kernel_size, stride, padding, patch_order)
    ctx.norms = (in_eps, out_eps, has_in_norm, has_out_norm)
    ctx.backend = backend


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output[1:])  # the backward's own tensors, not results
    _save(ctx, inputs, output[1:])


def _backward(ctx, grad_out, *_saved_grads):
    tensors = ctx.saved_tensors
    images, params, saved = tensors[0], tensors[1:9], tensors[9:]
    present = _grad_present(params, ctx.norms[2], ctx.norms[3])
    mask = [bool(ctx.needs_input_grad[1 + i]) and present[i] for i in range(8)]
    grad_out = grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out
    out = [None] * 8
    if any(mask):
        args = (grad_out, images, *params, *ctx.geometry, *ctx.norms, mask)
        if direct_call_ok((grad_out, images, *params)):  # eager: the launcher (ops/_fastpath.py)
            grads = _launchers(ctx.backend)[1](*args, saved)
        else:
            grads = patch_embed_bwd(*args, *saved, ctx.backend)
        out = [g if m else None for g, m in zip(grads, mask, strict=True)]
    grad_images = None
    if ctx.needs_input_grad[0]:  # stock ops (T2T's later soft splits take token maps)
        weight, bias, in_weight, in_bias, out_weight, out_bias, _, cls_token = params
        in_eps, out_eps, has_in_norm, has_out_norm = ctx.norms
        kernel_size, stride, padding, patch_order = ctx.geometry
        grad_images = _torch_ops.patch_embed_image_grad(
            grad_out, images, weight, bias,
            (in_weight, in_bias, in_eps) if has_in_norm else None,
            (out_weight, out_bias, out_eps) if has_out_norm else None,
            kernel_size=tuple(kernel_size), stride=tuple(stride), padding=tuple(padding),
            patch_order=patch_order, prefix=0 if cls_token is None else cls_token.shape[0],
        )
    return (grad_images, *out) + (None,) * 10


patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The custom op's forward and backward without torch.library, for eager calls
    that ``direct_call_ok`` admits: the same launchers, saved tensors and gradients."""

    @staticmethod
    def forward(ctx, *args):  # the custom op's arguments (save, backend last): the tokens
        res = _run_forward(args[-1], args[:-2], args[-2])
        _save(ctx, args, res[1:])
        return res[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out)


# ----------------------------------------------------------------------------
# backends


def _norm_parts(norm: Norm | None) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    return (None, None, 0.0) if norm is None else norm


def _kernel_call(backend: str, inputs: Inputs) -> torch.Tensor:
    kw = inputs.kwargs
    iw, ib, ieps = _norm_parts(kw["in_norm"])
    ow, ob, oeps = _norm_parts(kw["out_norm"])
    tensors = (kw["images"], kw["weight"], kw["bias"], iw, ib, ow, ob, kw["pos_embed"], kw["cls_token"])
    args = (
        *tensors, list(kw["kernel_size"]), list(kw["stride"]), list(kw["padding"]), kw["patch_order"],
        float(ieps), float(oeps), kw["in_norm"] is not None, kw["out_norm"] is not None,
    )  # fmt: skip
    save = needs_grad(tensors)  # the forward then writes what the backward reads
    if not direct_call_ok(tensors):
        return patch_embed_fwd(*args, save, backend)[0]
    if save:
        return _Direct.apply(*args, save, backend)
    return _launchers(backend)[0](*args)


def _tensors(kw: dict) -> dict[str, torch.Tensor | None]:
    iw, ib, _ = _norm_parts(kw["in_norm"])
    ow, ob, _ = _norm_parts(kw["out_norm"])
    return {
        "images": kw["images"], "weight": kw["weight"], "bias": kw["bias"],
        "in_norm weight": iw, "in_norm bias": ib, "out_norm weight": ow, "out_norm bias": ob,
        "pos_embed": kw["pos_embed"], "cls_token": kw["cls_token"],
    }  # fmt: skip


# ----------------------------------------------------------------------------
# backends: capabilities as data (checked by Backend.not_supported_reasons)


def _extension_op() -> str | None:
    reason = _cuda.unavailable_reason()
    if reason is None:
        missing = [n for n in ("patch_embed_fwd", "patch_embed_fwd_saving") if not _cuda.has_op(n)]
        if missing:
            reason = f"the CUDA extension has no {' or '.join(missing)} op (an older build: rebuild it)"
    return reason


def _triton_backward() -> str | None:
    err = triton_import_error()
    return None if err is None else f"its backward is the Triton one, but {err}"


class CudaBackend(Backend):
    name = "cuda"
    auto_if_faster_than = "triton"  # automatically only where the evidence says so
    devices = ("cuda",)
    auto_on_cpu = False
    dtypes = HALF
    min_compute_capability = (8, 0)
    requirements = (_extension_op, _triton_backward)

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _kernel_call("cuda", inputs)


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda",)
    interpreter = True
    auto_on_cpu = False
    dtypes = KERNEL_DTYPES
    min_compute_capability = (8, 0)
    requirements = (triton_import_error,)

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _kernel_call("triton", inputs)


class TorchBackend(Backend):
    name = "torch"
    dtypes = FLOAT_DTYPES

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _torch_ops.patch_embed(**inputs.kwargs)


class ReferenceBackend(Backend):
    name = "reference"

    def run(self, inputs: Inputs) -> torch.Tensor:
        return _reference.patch_embed(**inputs.kwargs)


BACKENDS: list[Backend] = [CudaBackend(), TritonBackend(), TorchBackend(), ReferenceBackend()]
_DECISIONS = DecisionCache("patch_embed", BACKENDS)


# ----------------------------------------------------------------------------
# validation


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    vals = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    ok = (
        isinstance(vals, (tuple, list))
        and len(vals) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in vals)
    )
    if not ok:
        raise TypeError(f"patch_embed: {name}={value!r}; expected an int or a pair of ints")
    if min(vals) < minimum:
        raise ValueError(f"patch_embed: {name}={value!r}; expected values >= {minimum}")
    return int(vals[0]), int(vals[1])


def patch_grid(
    image_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
) -> tuple[int, int]:
    """(rows, cols) of patches nn.Unfold takes from an image of image_size (H, W)."""
    (H, W), (kh, kw), (sh, sw), (ph, pw) = image_size, kernel_size, stride, padding
    return (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1


def _check_tensor(name: str, t: Any, optional: bool = True) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"patch_embed: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"patch_embed: {name} has dtype {t.dtype}; expected a floating-point tensor "
            "(float16, bfloat16, float32 or float64)"
        )


def _check_norm(name: str, norm: Any, size: int, what: str) -> Norm | None:
    if norm is None:
        return None
    if not isinstance(norm, (tuple, list)) or len(norm) != 3:
        raise TypeError(
            f"patch_embed: {name} must be a (weight, bias, eps) tuple or None, got {norm!r:.80}"
        )
    w, b, eps = norm
    for part, t in (("weight", w), ("bias", b)):
        _check_tensor(f"{name} {part}", t)
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(
                f"patch_embed: {name} {part} has shape {_shape(t)}; expected ({size},) ({what})"
            )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"patch_embed: {name} eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"patch_embed: {name} eps={eps}; expected a finite float >= 0")
    return (w, b, float(eps))


def _validate(
    images, weight, bias, kernel_size, stride, padding, patch_order, in_norm, out_norm,
    pos_embed, cls_token,
) -> dict[str, Any]:
    _check_tensor("images", images, optional=False)
    _check_tensor("weight", weight, optional=False)
    if images.ndim != 4:
        raise ValueError(f"patch_embed: images has shape {_shape(images)}; expected (B, C, H, W)")
    B, C, H, W = images.shape
    if C < 1:
        raise ValueError(f"patch_embed: images has C={C} channels; expected at least 1")
    if patch_order not in _ORDERS:
        raise ValueError(f"patch_embed: patch_order={patch_order!r}; expected 'cpq' or 'pqc'")
    ks = _pair("kernel_size", kernel_size, 1)
    st = ks if stride is None else _pair("stride", stride, 1)
    pad = _pair("padding", padding, 0)
    kh, kw = ks
    K = C * kh * kw
    if weight.ndim == 4:
        if patch_order != "cpq":
            raise ValueError(
                f"patch_embed: a Conv2d weight {_shape(weight)} orders its columns (c, p, q); "
                f"patch_order={patch_order!r} needs a (D, K) weight in that order"
            )
        if tuple(weight.shape[1:]) != (C, kh, kw):
            raise ValueError(
                f"patch_embed: weight has shape {_shape(weight)}; expected (D, {C}, {kh}, {kw}) "
                f"for images with C={C} and kernel_size={ks}"
            )
    elif weight.ndim != 2:
        raise ValueError(
            f"patch_embed: weight has shape {_shape(weight)}; expected (D, K) or a Conv2d "
            "weight (D, C, kh, kw)"
        )
    elif weight.shape[1] != K:
        raise ValueError(
            f"patch_embed: weight has shape {_shape(weight)}; expected (D, {K}): K = C*kh*kw = "
            f"{C}*{kh}*{kw} for images with C={C} channels and kernel_size={ks}"
        )
    D = weight.shape[0]
    if D < 1:
        raise ValueError(f"patch_embed: weight has D={D} output features; expected at least 1")
    for n, k, s, p, axis in ((H, kh, st[0], pad[0], "height"), (W, kw, st[1], pad[1], "width")):
        if n + 2 * p < k:
            raise ValueError(
                f"patch_embed: image {axis} {n} with padding {p} is smaller than the kernel {k}; "
                "expected a larger image or more padding"
            )
        covered = ((n + 2 * p - k) // s) * s + k - p  # last image index + 1 any patch reaches
        if covered < n:
            raise ValueError(
                f"patch_embed: the patch grid (kernel {k}, stride {s}, padding {p}) does not cover "
                f"the image {axis} {n}: its last {n - covered} pixel(s) would be dropped; expected "
                f"{axis} + 2*padding - kernel to be a multiple of the stride (e.g. {axis} "
                f"{n - (n + 2 * p - k) % s} or {n - (n + 2 * p - k) % s + s})"
            )
    L = patch_grid((H, W), ks, st, pad)
    L = L[0] * L[1]
    _check_tensor("bias", bias)
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"patch_embed: bias has shape {_shape(bias)}; expected ({D},)")
    in_norm = _check_norm("in_norm", in_norm, K, "K = C*kh*kw, one per patch element")
    out_norm = _check_norm("out_norm", out_norm, D, "D, one per output feature")
    P = 0
    if cls_token is not None:
        _check_tensor("cls_token", cls_token)
        shape = tuple(cls_token.shape)
        ok = (
            (len(shape) == 1 and shape == (D,))
            or (len(shape) == 2 and shape[1] == D and shape[0] >= 1)
            or (len(shape) == 3 and shape[0] == 1 and shape[2] == D and shape[1] >= 1)
        )
        if not ok:
            raise ValueError(
                f"patch_embed: cls_token has shape {_shape(cls_token)}; expected ({D},), (P, {D}) "
                f"or (1, P, {D})"
            )
        cls_token = cls_token.reshape(-1, D)
        P = cls_token.shape[0]
    if pos_embed is not None:
        _check_tensor("pos_embed", pos_embed)
        shape = tuple(pos_embed.shape)
        rows = (L, P + L)  # a tuple: under torch.jit.trace sizes are tensors, which hash by id
        ok = (len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)) and shape[-1] == D
        if not ok or shape[-2] not in rows:
            want = f"{L}" if P == 0 else f"{P + L} (every token) or {L} (patch tokens only)"
            raise ValueError(
                f"patch_embed: pos_embed has shape {_shape(pos_embed)}; expected ((1,) T, {D}) "
                f"with T = {want}: {L} patches from a {H}x{W} image"
                + (f" and {P} prefix token(s)" if P else "")
            )
        pos_embed = pos_embed.reshape(-1, D)
    tensors = [images, weight, bias, pos_embed, cls_token]
    for norm in (in_norm, out_norm):
        if norm is not None:
            tensors += [norm[0], norm[1]]
    for name, t in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed),
                    ("cls_token", cls_token)):
        if t is not None and t.dtype != images.dtype:
            raise TypeError(
                f"patch_embed: {name} has dtype {t.dtype} but images have {images.dtype}; "
                "expected every tensor in the images' dtype"
            )
    for nname, norm in (("in_norm", in_norm), ("out_norm", out_norm)):
        for part, t in zip(("weight", "bias"), norm[:2] if norm else (), strict=False):
            if t is not None and t.dtype != images.dtype:
                raise TypeError(
                    f"patch_embed: {nname} {part} has dtype {t.dtype} but images have "
                    f"{images.dtype}; expected every tensor in the images' dtype"
                )
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"patch_embed: tensors on different devices ({', '.join(sorted(map(str, devices)))}); "
            "expected one device"
        )
    return {
        "images": images,
        "weight": weight.reshape(D, K),
        "bias": bias,
        "kernel_size": ks,
        "stride": st,
        "padding": pad,
        "patch_order": patch_order,
        "in_norm": in_norm,
        "out_norm": out_norm,
        "pos_embed": pos_embed,
        "cls_token": cls_token,
    }


# ----------------------------------------------------------------------------
# public function


def _inputs(
    images: Any,
    weight: Any,
    bias: Any = None,
    *,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    patch_order: Any = "cpq",
    in_norm: Any = None,
    out_norm: Any = None,
    pos_embed: Any = None,
    cls_token: Any = None,
) -> Inputs:
    """The validated call, as dispatch sees it."""
    kw = _validate(
        images, weight, bias, kernel_size, stride, padding, patch_order, in_norm, out_norm,
        pos_embed, cls_token,
    )  # fmt: skip
    return Inputs("patch_embed", _tensors(kw), kwargs=kw)


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    patch_order: str = "cpq",
    in_norm: Norm | None = None,
    out_norm: Norm | None = None,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Patch embedding: tokens = out_norm(in_norm(unfold(images)) @ weight.T + bias),
    prefix tokens prepended, position embedding added.

    Args:
        images: (B, C, H, W), any strides (NCHW, channels_last, views).
        weight: (D, K) with K = C*kh*kw in patch_order, or a Conv2d weight
            (D, C, kh, kw) (patch_order "cpq").
        bias: (D,) or None.
        kernel_size, stride, padding: as nn.Unfold / Conv2d (an int or a pair);
            stride defaults to kernel_size. The patch grid must reach every pixel.
        patch_order: "cpq" (Conv2d, nn.Unfold) or "pqc" (vit-pytorch's
            ``Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')``).
        in_norm: (weight (K,) or None, bias (K,) or None, eps): layer norm over
            each patch before the projection.
        out_norm: (weight (D,) or None, bias (D,) or None, eps): layer norm of
            each token after it.
        pos_embed: ((1,) P+L, D) added to every token, or ((1,) L, D) added to
            the patch tokens only.
        cls_token: (D,), (P, D) or (1, P, D): P prefix tokens.
        backend: "reference", "torch", "triton" or "cuda"; None dispatches.

    Returns:
        (B, P + L, D) in the images' dtype, L = Ho * Wo patches in row-major order.

    Under ``torch.autocast`` for the images' device, every float32 tensor (float16
    and bfloat16 ones too, float64 ones never) is cast to autocast's dtype first,
    as autocast casts F.conv2d's and F.linear's inputs: bfloat16 images with float32
    parameters are no error there, and the result is in autocast's dtype.
    """
    cast = _autocast_dtype(images)
    if cast is not None:
        images, weight, bias, pos_embed, cls_token = (
            _cast(t, cast) for t in (images, weight, bias, pos_embed, cls_token)
        )
        in_norm, out_norm = _cast_norm(in_norm, cast), _cast_norm(out_norm, cast)
    norms = [_norm_key(in_norm), _norm_key(out_norm)]
    key = None
    if None not in norms:
        key = _DECISIONS.key(
            backend, (images, weight, bias, pos_embed, cls_token, *norms[0][0], *norms[1][0]),
            (kernel_size, stride, padding, patch_order, norms[0][1], norms[1][1]),
        )  # fmt: skip
    hit = _DECISIONS.get(key)
    if hit is not None:  # this signature validated and chose hit[0] before
        chosen, checked = hit
        kw = _checked_kwargs(images, weight, bias, in_norm, out_norm, pos_embed, cls_token, checked)
        return chosen.run(Inputs("patch_embed", _tensors(kw), kwargs=kw))
    inputs = _inputs(
        images, weight, bias, kernel_size=kernel_size, stride=stride, padding=padding,
        patch_order=patch_order, in_norm=in_norm, out_norm=out_norm, pos_embed=pos_embed,
        cls_token=cls_token,
    )  # fmt: skip
    chosen = select(BACKENDS, inputs, backend)
    _DECISIONS.put(key, chosen, _checked(inputs.kwargs))
    return chosen.run(inputs)


def _autocast_dtype(images: Any) -> torch.dtype | None:
    """autocast's dtype where it is on for the images' device (and not while torch.fx
    traces), else None."""
    if not isinstance(images, torch.Tensor) or isinstance(images, torch.fx.Proxy):
        return None
    device = images.device.type
    try:
        if not torch.is_autocast_enabled(device):
            return None
    except RuntimeError:  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(device)


def _cast(t: Any, dtype: torch.dtype) -> Any:
    """autocast's cast: floating tensors other than float64 to ``dtype``; others as they are."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype):
        return t.to(dtype)
    return t


def _cast_norm(norm: Any, dtype: torch.dtype) -> Any:
    if type(norm) in (tuple, list) and len(norm) == 3:
        return (_cast(norm[0], dtype), _cast(norm[1], dtype), norm[2])
    return norm  # malformed: the checked path explains it


def _norm_key(norm: Any) -> tuple[tuple[Any, Any], Any] | None:
    """(the norm's tensors, the rest of it) for the decision key; None for a malformed
    norm (the checked path explains it)."""
    if norm is None:
        return (None, None), None
    if type(norm) in (tuple, list) and len(norm) == 3:
        return (norm[0], norm[1]), (type(norm).__name__, norm[2])
    return None


def _checked(kw: dict[str, Any]) -> dict[str, Any]:
    """What a checked call's kwargs hold besides the caller's tensors (and views of them)."""
    D, K = kw["weight"].shape
    keep = ("kernel_size", "stride", "padding", "patch_order")
    eps = {n: None if kw[n] is None else kw[n][2] for n in ("in_norm", "out_norm")}
    return {"D": D, "K": K, "eps": eps, **{n: kw[n] for n in keep}}


def _checked_kwargs(images, weight, bias, in_norm, out_norm, pos_embed, cls_token, checked):
    """The kwargs the checked path builds for these tensors, from what it kept (_checked)."""
    D, K, eps = checked["D"], checked["K"], checked["eps"]
    return {
        "images": images,
        "weight": weight.reshape(D, K),
        "bias": bias,
        "kernel_size": checked["kernel_size"],
        "stride": checked["stride"],
        "padding": checked["padding"],
        "patch_order": checked["patch_order"],
        "in_norm": None if in_norm is None else (in_norm[0], in_norm[1], eps["in_norm"]),
        "out_norm": None if out_norm is None else (out_norm[0], out_norm[1], eps["out_norm"]),
        "pos_embed": None if pos_embed is None else pos_embed.reshape(-1, D),
        "cls_token": None if cls_token is None else cls_token.reshape(-1, D),
    }


def which_backend(
    *args: Any, backend: str | None = None, **kwargs: Any
) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """For the arguments of ``patch_embed``: the backend it would run (None: none can)
    and each backend's reasons to refuse (empty for one that can). Runs nothing."""
    return explain(BACKENDS, _inputs(*args, **kwargs), backend)
