"""Triton kernels for ``patch_embed``: convolution as a GEMM whose A operand is
gathered from the image inside the loads (no unfolded tensor in memory).

    tokens[b, l, :] = out_norm(in_norm(patch(b, l)) @ weight.T + bias) (+ pos)
    out = cat(cls (+ pos[:P]), tokens)                       # (B, P + L, D)

The input layer norm is folded into the GEMM: with g, beta its affine and
W' = W * g (made per call by one small launch, ``_prep_kernel``, which also
permutes the columns to the kernel's patch order),

    in_norm(x) @ W.T = rstd * (x @ W'.T - mu * rowsum(W')) + beta @ W.T

so the kernel multiplies the raw patch and gathers mu, rstd (sum and sum of
squares in float32) from the same loaded tiles. The output layer norm, bias,
position embedding and class token run in the epilogue; with an output norm one
program owns BLOCK_M whole rows and makes two passes over D (statistics, then
normalise what it wrote: the same rounding eager's Linear -> LayerNorm has).

The kernel reads patches in the order that is contiguous in memory ("cpq" for
NCHW images, "pqc" for channels_last); the weight and the input norm's affine
(D x K, small) are permuted to it when the caller's patch_order differs.

Launcher contract (positional arguments; the CUDA extension's op
``vitkernels_C.patch_embed_fwd`` mirrors it exactly, and so must a
``patch_embed_bwd`` if the extension ever registers one; until then the cuda
backend's backward is ``patch_embed_bwd`` below):

    patch_embed_fwd(images, weight, bias, in_weight, in_bias, out_weight, out_bias,
                    pos_embed, cls_token, kernel_size, stride, padding, patch_order,
                    in_eps, out_eps, has_in_norm, has_out_norm) -> out

      images      (B, C, H, W) float16 / bfloat16 / float32, any strides
      weight      (D, K), K = C * kh * kw in patch_order, images' dtype, any strides
      bias        (D,) or None
      in_weight, in_bias    (K,) or None (in patch_order)
      out_weight, out_bias  (D,) or None
      pos_embed   (T, D) or None, T = L (patch tokens only) or P + L (every token)
      cls_token   (P, D) or None (P prefix tokens)
      kernel_size, stride, padding: list[int] of 2 (rows, cols)
      patch_order "cpq" | "pqc"; in_eps, out_eps: float
      has_in_norm, has_out_norm: bool (a norm may have no affine)
      -> out (B, P + L, D), images' dtype, contiguous;
         L = Ho * Wo, Ho = (H + 2 ph - kh) // sh + 1, Wo likewise.
      Every tensor is on one device with the images' dtype.

    patch_embed_bwd(grad_out, images, weight, bias, in_weight, in_bias, out_weight,
                    out_bias, pos_embed, cls_token, kernel_size, stride, padding,
                    patch_order, in_eps, out_eps, has_in_norm, has_out_norm, grad_mask)
        -> (d_weight, d_bias, d_in_weight, d_in_bias, d_out_weight, d_out_bias,
            d_pos_embed, d_cls_token)

      grad_out    (B, P + L, D), any strides
      grad_mask   list[bool] of 8, the results in that order
      each result has its input's shape and dtype, or is an empty (0,) tensor where
      the input is None or its grad_mask entry is False. No image gradient.

Backward: the patch rows' pre-norm tokens are recomputed with the forward kernel
(only with an output norm), the output norm's backward runs row-wise
(``_out_norm_bwd_kernel``), dW = dy.T @ in_norm(patches) is a split-M GEMM that
gathers the patches again (``_dw_kernel``), and the input norm's affine grads
come from dxn = dy @ W with the normalised patch in the epilogue
(``_dxn_kernel``); the small sums over the batch (pos, cls, bias, partials) are
torch reductions.

Block sizes come from ``fwd_config`` / ``bwd_config``: a small deterministic
heuristic of the shape (a GPU tuning pass may change them); tests monkeypatch
them to force several tiles through the interpreter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from vitkernels.ops._dispatch import triton_interpret
from vitkernels.triton._aot import AotSpec

__all__ = ["AOT_SPECS", "bwd_config", "fwd_config", "patch_embed_bwd", "patch_embed_fwd"]


# ----------------------------------------------------------------------------
# kernels


@triton.jit
def _idx(i, IDX64: tl.constexpr):
    """An index in the integer width the launcher asked for (int64 for huge tensors)."""
    if IDX64:
        return i.to(tl.int64)
    return i


@triton.jit
def _hint(base, offs, V0: tl.constexpr, V1: tl.constexpr):
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
def _mask2(ok0, ok1, V0: tl.constexpr, V1: tl.constexpr):
    """ok0[:, None] & ok1[None, :], uniform over aligned runs of V0 rows / V1
    columns (the launcher checked the bound is a multiple of the run)."""
    mask = ok0[:, None] & ok1[None, :]
    if V0 > 1 or V1 > 1:
        mask = tl.max_constancy(mask, [V0, V1])
    return mask


@triton.jit
def _patch_rows(
    pid_m, M, L, Wout, SH, SW, PH, PW, sxb, sxh, sxw, BLOCK_M: tl.constexpr, IDX64: tl.constexpr
):
    """Row m = b * L + l of the GEMM -> image offset of the patch's top-left pixel."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    b = offs_m // L
    l = offs_m % L
    ih0 = (l // Wout) * SH - PH
    iw0 = (l % Wout) * SW - PW
    row_base = _idx(b, IDX64) * sxb + ih0 * sxh + iw0 * sxw  # may point into the padding
    return offs_m, row_ok, b, l, ih0, iw0, row_base


@triton.jit
def _patch_tile(
    x_ptr, row_base, ih0, iw0, row_ok, offs_k, K, C, H, W, KW, KHW, sxc, sxh, sxw,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr,
):
    """(BLOCK_M, BLOCK_K) tile of unfold(images): zero outside the image (padding)."""
    if PQC:  # k = (p * KW + q) * C + c
        c = offs_k % C
        pq = offs_k // C
    else:  # k = c * KH * KW + p * KW + q
        c = offs_k // KHW
        pq = offs_k % KHW
    p = pq // KW
    q = pq % KW
    col = c * sxc + p * sxh + q * sxw
    ptrs = _hint(x_ptr, row_base[:, None] + col[None, :], 1, VEC)
    if MASK_HW:
        ih = ih0[:, None] + p[None, :]
        iw = iw0[:, None] + q[None, :]
        mask = row_ok[:, None] & (offs_k < K)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if VEC > 1:
            mask = tl.max_constancy(mask, [1, VEC])
        return tl.load(ptrs, mask=mask, other=0.0)
    elif EVEN_M and EVEN_K:
        return tl.load(ptrs)
    elif EVEN_K:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=_mask2(row_ok, offs_k < K, 1, VEC), other=0.0)


@triton.jit
def _gemm_rows(
    x_ptr, w_ptr, row_base, ih0, iw0, row_ok, offs_n, n_ok, K, C, H, W, KW, KHW,
    sxc, sxh, sxw, swn, swk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr, VEC: tl.constexpr, WVEC: tl.constexpr, IN_NORM: tl.constexpr,
    PREC: tl.constexpr,
):
    """patches @ W.T for BLOCK_M rows and BLOCK_N columns; with IN_NORM also the
    rows' sum and sum of squares over K (float32)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _patch_tile(
            x_ptr, row_base, ih0, iw0, row_ok, offs_k, K, C, H, W, KW, KHW, sxc, sxh, sxw,
            PQC, MASK_HW, EVEN_M, EVEN_K, VEC,
        )
        w_ptrs = _hint(w_ptr, offs_k[:, None] * swk + offs_n[None, :] * swn, WVEC, 1)  # W.T tile
        if EVEN_K and EVEN_N:
            b = tl.load(w_ptrs)
        elif EVEN_K:
            b = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            b = tl.load(w_ptrs, mask=_mask2(offs_k < K, n_ok, WVEC, 1), other=0.0)
        if IN_NORM:
            af = a.to(tl.float32)
            s1 += tl.sum(af, axis=1)
            s2 += tl.sum(af * af, axis=1)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc, s1, s2


@triton.jit
def _in_norm_stats(s1, s2, K, in_eps):
    mu = s1 / K
    var = tl.maximum(s2 / K - mu * mu, 0.0)
    return mu, 1.0 / tl.sqrt(var + in_eps)


@triton.jit
def _chan_update(mean, m2, y, n_ok, n0):
    """Merge one column tile's (mean, M2) into the running ones (Chan et al.)."""
    nb = tl.sum(n_ok.to(tl.float32), axis=0)  # columns in this tile
    na = n0 * 1.0  # columns merged before it
    t_mean = tl.sum(tl.where(n_ok[None, :], y, 0.0), axis=1) / nb
    dev = tl.where(n_ok[None, :], y - t_mean[:, None], 0.0)
    t_m2 = tl.sum(dev * dev, axis=1)
    delta = t_mean - mean
    tot = na + nb
    return mean + delta * (nb / tot), m2 + t_m2 + delta * delta * (na * nb / tot)


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, colsum_ptr, shift_ptr, ow_ptr, ob_ptr, pos_ptr, cls_ptr, out_ptr, stats_ptr,
    M, L, Wout, D, K, C, H, W, KW, KHW, SH, SW, PH, PW, P,
    sxb, sxc, sxh, sxw, swn, swk, spt, spd, scp, scd, sob, sot, sod,
    in_eps, out_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IDX64: tl.constexpr, EVEN_N: tl.constexpr, WVEC: tl.constexpr,
    OVEC: tl.constexpr, IN_NORM: tl.constexpr, HAS_SHIFT: tl.constexpr, OUT_NORM: tl.constexpr,
    HAS_OW: tl.constexpr, HAS_OB: tl.constexpr, HAS_POS: tl.constexpr, POS_ALL: tl.constexpr,
    HAS_CLS: tl.constexpr, WRITE_STATS: tl.constexpr, PREC: tl.constexpr,
):
    """out[b, P + l, n] for a (BLOCK_M, BLOCK_N) tile, or BLOCK_M whole rows with OUT_NORM.

    Grid: (cdiv(M, BLOCK_M) * cdiv(D, BLOCK_N),) with the column tile fastest
    (the A rows stay in L2 across columns); (cdiv(M, BLOCK_M),) with OUT_NORM.
    """
    pid = tl.program_id(0)
    if OUT_NORM:
        pid_m = pid
        n_start = 0
        n_end = D
    else:
        num_n = tl.cdiv(D, BLOCK_N)
        pid_m = pid // num_n
        n_start = (pid % num_n) * BLOCK_N
        n_end = n_start + BLOCK_N
    offs_m, row_ok, b, l, ih0, iw0, row_base = _patch_rows(
        pid_m, M, L, Wout, SH, SW, PH, PW, sxb, sxh, sxw, BLOCK_M, IDX64
    )
    x_base = row_base
    out_rows = out_ptr + _idx(b, IDX64) * sob + (P + l) * sot  # (BLOCK_M,) pointers
    if POS_ALL:
        pos_rows = pos_ptr + (P + l) * spt
    else:
        pos_rows = pos_ptr + l * spt
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mu = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        acc, s1, s2 = _gemm_rows(
            x_ptr, w_ptr, x_base, ih0, iw0, row_ok, offs_n, n_ok, K, C, H, W, KW, KHW,
            sxc, sxh, sxw, swn, swk, BLOCK_M, BLOCK_N, BLOCK_K, PQC, MASK_HW, EVEN_M, EVEN_N,
            EVEN_K, VEC, WVEC, IN_NORM, PREC,
        )
        y = acc
        if IN_NORM:
            mu, rstd = _in_norm_stats(s1, s2, K, in_eps)
            colsum = tl.load(colsum_ptr + offs_n, mask=n_ok, other=0.0)
            y = rstd[:, None] * (y - mu[:, None] * colsum[None, :])
        if HAS_SHIFT:
            y += tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        mask = _mask2(row_ok, n_ok, 1, OVEC)
        if OUT_NORM:
            mean, m2 = _chan_update(mean, m2, y, n_ok, n0)
        elif HAS_POS:
            pos = tl.load(_hint(pos_rows[:, None], offs_n[None, :] * spd, 1, OVEC), mask=mask, other=0.0)
            y += pos.to(tl.float32)
        out_ptrs = _hint(out_rows[:, None], offs_n[None, :] * sod, 1, OVEC)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if OUT_NORM:
        # second pass over the row block: normalise what this program wrote
        tl.debug_barrier()
        rstd_o = 1.0 / tl.sqrt(m2 / D + out_eps)
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < D
            mask = _mask2(row_ok, n_ok, 1, OVEC)
            ptrs = _hint(out_rows[:, None], offs_n[None, :] * sod, 1, OVEC)
            y = (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd_o[:, None]
            if HAS_OW:
                y *= tl.load(ow_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_OB:
                y += tl.load(ob_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_POS:
                pos_ptrs = _hint(pos_rows[:, None], offs_n[None, :] * spd, 1, OVEC)
                y += tl.load(pos_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_CLS:
        # the program holding an image's first patch writes its prefix tokens too
        first = row_ok & (l == 0)
        out_img = out_ptr + _idx(b, IDX64) * sob
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < D
            mask = first[:, None] & n_ok[None, :]
            for p in range(0, P):
                tok = tl.load(cls_ptr + p * scp + offs_n * scd, mask=n_ok, other=0.0).to(tl.float32)
                if POS_ALL:
                    tok += tl.load(pos_ptr + p * spt + offs_n * spd, mask=n_ok, other=0.0).to(tl.float32)
                val = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + tok[None, :]
                tl.store(
                    out_img[:, None] + p * sot + offs_n[None, :] * sod,
                    val.to(out_ptr.dtype.element_ty),
                    mask=mask,
                )
    if WRITE_STATS:
        tl.store(stats_ptr + offs_m * 2, mu, mask=row_ok)
        tl.store(stats_ptr + offs_m * 2 + 1, rstd, mask=row_ok)


@triton.jit
def _patch_stats_kernel(
    x_ptr, stats_ptr, M, L, Wout, K, C, H, W, KW, KHW, SH, SW, PH, PW,
    sxb, sxc, sxh, sxw, in_eps,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IDX64: tl.constexpr,
):
    """stats[m] = (mu, rstd) of patch m over K, as the forward kernel computes them."""
    pid_m = tl.program_id(0)
    offs_m, row_ok, b, l, ih0, iw0, row_base = _patch_rows(
        pid_m, M, L, Wout, SH, SW, PH, PW, sxb, sxh, sxw, BLOCK_M, IDX64
    )
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _patch_tile(
            x_ptr, row_base, ih0, iw0, row_ok, offs_k, K, C, H, W, KW, KHW, sxc, sxh, sxw,
            PQC, MASK_HW, EVEN_M, EVEN_K, VEC,
        ).to(tl.float32)
        s1 += tl.sum(a, axis=1)
        s2 += tl.sum(a * a, axis=1)
    mu, rstd = _in_norm_stats(s1, s2, K, in_eps)
    tl.store(stats_ptr + offs_m * 2, mu, mask=row_ok)
    tl.store(stats_ptr + offs_m * 2 + 1, rstd, mask=row_ok)


@triton.jit
def _out_norm_bwd_kernel(
    g_ptr, y_ptr, ow_ptr, dy_ptr, dow_part, dob_part, dbias_part,
    M, L, D, P, sgb, sgt, sgd, out_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_OW: tl.constexpr, IDX64: tl.constexpr,
    GVEC: tl.constexpr, YVEC: tl.constexpr,
):
    """Backward of the output layer norm for BLOCK_M patch rows.

    y (M, D) float32: recomputed pre-norm tokens; g: grad_out's patch rows.
    dy (M, D) (MMA dtype) = d loss / d y; per-program column partial sums for
    the norm's weight (g * xhat), its bias (g) and the linear bias (dy).
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    b = offs_m // L
    l = offs_m % L
    g_rows = g_ptr + _idx(b, IDX64) * sgb + (P + l) * sgt
    y_rows = y_ptr + _idx(offs_m, IDX64) * D
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        y = tl.load(_hint(y_rows[:, None], offs_n[None, :], 1, YVEC), mask=_mask2(row_ok, n_ok, 1, YVEC), other=0.0)
        mean, m2 = _chan_update(mean, m2, y, n_ok, n0)
    rstd = 1.0 / tl.sqrt(m2 / D + out_eps)
    a1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        mask = _mask2(row_ok, n_ok, 1, YVEC)
        y = tl.load(_hint(y_rows[:, None], offs_n[None, :], 1, YVEC), mask=mask, other=0.0)
        xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
        g = tl.load(_hint(g_rows[:, None], offs_n[None, :] * sgd, 1, GVEC), mask=mask, other=0.0).to(tl.float32)
        tl.store(dow_part + pid_m * D + offs_n, tl.sum(g * xhat, axis=0), mask=n_ok)
        tl.store(dob_part + pid_m * D + offs_n, tl.sum(g, axis=0), mask=n_ok)
        if HAS_OW:
            g = g * tl.load(ow_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        a1 += tl.sum(g, axis=1)
        a2 += tl.sum(g * xhat, axis=1)
    a1 = a1 / D
    a2 = a2 / D
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        mask = _mask2(row_ok, n_ok, 1, YVEC)
        y = tl.load(_hint(y_rows[:, None], offs_n[None, :], 1, YVEC), mask=mask, other=0.0)
        xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
        g = tl.load(_hint(g_rows[:, None], offs_n[None, :] * sgd, 1, GVEC), mask=mask, other=0.0).to(tl.float32)
        if HAS_OW:
            g = g * tl.load(ow_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        dy = tl.where(mask, rstd[:, None] * (g - a1[:, None] - xhat * a2[:, None]), 0.0)
        tl.store(dbias_part + pid_m * D + offs_n, tl.sum(dy, axis=0), mask=n_ok)
        tl.store(
            _hint(dy_ptr, _idx(offs_m, IDX64)[:, None] * D + offs_n[None, :], 1, YVEC),
            dy.to(dy_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _norm_patch_tile(
    x_ptr, stats_ptr, gin_ptr, bin_ptr, row_base, ih0, iw0, row_ok, offs_m, offs_k,
    K, C, H, W, KW, KHW, sxc, sxh, sxw,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IN_NORM: tl.constexpr, HAS_GIN: tl.constexpr, HAS_BIN: tl.constexpr,
):
    """in_norm(patches) tile in float32 (raw patches without IN_NORM); zero where
    k >= K or the row is past M. Also returns xhat (the normalised patch)."""
    x = _patch_tile(
        x_ptr, row_base, ih0, iw0, row_ok, offs_k, K, C, H, W, KW, KHW, sxc, sxh, sxw,
        PQC, MASK_HW, EVEN_M, EVEN_K, VEC,
    ).to(tl.float32)
    if IN_NORM:
        mu = tl.load(stats_ptr + offs_m * 2, mask=row_ok, other=0.0)
        rstd = tl.load(stats_ptr + offs_m * 2 + 1, mask=row_ok, other=0.0)
        k_ok = offs_k < K
        valid = row_ok[:, None] & k_ok[None, :]
        xhat = tl.where(valid, (x - mu[:, None]) * rstd[:, None], 0.0)
        xn = xhat
        if HAS_GIN:
            xn = xn * tl.load(gin_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIN:
            xn = tl.where(valid, xn + tl.load(bin_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :], 0.0)
    else:
        xhat = x
        xn = x
    return xn, xhat


@triton.jit
def _dw_kernel(
    x_ptr, dy_ptr, stats_ptr, gin_ptr, bin_ptr, ws_ptr,
    M, L, Wout, D, K, C, H, W, KW, KHW, SH, SW, PH, PW, P,
    sxb, sxc, sxh, sxw, sdb, sdt, sdd, blocks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IDX64: tl.constexpr, DVEC: tl.constexpr,
    IN_NORM: tl.constexpr, HAS_GIN: tl.constexpr, HAS_BIN: tl.constexpr, PREC: tl.constexpr,
):
    """ws[s, n, k] = sum over split s's rows m of dy[m, n] * in_norm(patch m)[k].

    Grid: (cdiv(D, BLOCK_N) * cdiv(K, BLOCK_K), SPLIT). dy rows at
    dy_ptr + b * sdb + (P + l) * sdt (grad_out's patch rows or a (M, D) buffer).
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    offs_n = (pid // num_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = (pid % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < D
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    mb0 = pid_s * blocks_per_split
    mb1 = tl.minimum(mb0 + blocks_per_split, tl.cdiv(M, BLOCK_M))
    for mb in range(mb0, mb1):
        offs_m, row_ok, b, l, ih0, iw0, row_base = _patch_rows(
            mb, M, L, Wout, SH, SW, PH, PW, sxb, sxh, sxw, BLOCK_M, IDX64
        )
        dy_rows = dy_ptr + _idx(b, IDX64) * sdb + (P + l) * sdt
        dyt = tl.load(
            _hint(dy_rows[None, :], offs_n[:, None] * sdd, DVEC, 1),
            mask=_mask2(n_ok, row_ok, DVEC, 1),
            other=0.0,
        )  # (BLOCK_N, BLOCK_M) = dy.T
        xn, xhat = _norm_patch_tile(
            x_ptr, stats_ptr, gin_ptr, bin_ptr, row_base, ih0, iw0, row_ok, offs_m, offs_k,
            K, C, H, W, KW, KHW, sxc, sxh, sxw, PQC, MASK_HW, EVEN_M, EVEN_K, VEC,
            IN_NORM, HAS_GIN, HAS_BIN,
        )
        acc = tl.dot(dyt, xn.to(dyt.dtype), acc, input_precision=PREC)
    ws = ws_ptr + _idx(pid_s, IDX64) * D * K
    tl.store(
        ws + offs_n[:, None] * K + offs_k[None, :],
        acc,
        mask=n_ok[:, None] & (offs_k < K)[None, :],
    )


@triton.jit
def _dxn_kernel(
    x_ptr, dy_ptr, w_ptr, stats_ptr, dg_part, db_part,
    M, L, Wout, D, K, C, H, W, KW, KHW, SH, SW, PH, PW, P,
    sxb, sxc, sxh, sxw, sdb, sdt, sdd, swn, swk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IDX64: tl.constexpr, DVEC: tl.constexpr, WVEC: tl.constexpr,
    PREC: tl.constexpr,
):
    """dxn = dy @ W for a (BLOCK_M, BLOCK_K) tile; column partial sums over the
    tile's rows of dxn * xhat (-> in_norm weight) and dxn (-> in_norm bias).

    Grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K),), the K tile fastest.
    """
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // num_k
    offs_k = (pid % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_m, row_ok, b, l, ih0, iw0, row_base = _patch_rows(
        pid_m, M, L, Wout, SH, SW, PH, PW, sxb, sxh, sxw, BLOCK_M, IDX64
    )
    dy_rows = dy_ptr + _idx(b, IDX64) * sdb + (P + l) * sdt
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        dy_ptrs = _hint(dy_rows[:, None], offs_n[None, :] * sdd, 1, DVEC)
        dy = tl.load(dy_ptrs, mask=_mask2(row_ok, n_ok, 1, DVEC), other=0.0)
        w = tl.load(
            _hint(w_ptr, offs_n[:, None] * swn + offs_k[None, :] * swk, 1, WVEC),
            mask=_mask2(n_ok, k_ok, 1, WVEC),
            other=0.0,
        )
        acc = tl.dot(dy, w, acc, input_precision=PREC)
    xn, xhat = _norm_patch_tile(
        x_ptr, stats_ptr, x_ptr, x_ptr, row_base, ih0, iw0, row_ok, offs_m, offs_k,
        K, C, H, W, KW, KHW, sxc, sxh, sxw, PQC, MASK_HW, EVEN_M, EVEN_K, VEC,
        True, False, False,
    )
    tl.store(dg_part + pid_m * K + offs_k, tl.sum(acc * xhat, axis=0), mask=k_ok)
    tl.store(db_part + pid_m * K + offs_k, tl.sum(acc, axis=0), mask=k_ok)


@triton.jit
def _prep_kernel(
    w_ptr, g_ptr, b_ptr, bias_ptr, wk_ptr, colsum_ptr, shift_ptr,
    D, K, C, KHW, swn, swk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SRC_PQC: tl.constexpr, DST_PQC: tl.constexpr,
    HAS_G: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """The input norm folded into the weight, in the kernel's patch order (one launch):
    wk[n, k] = W[n, src(k)] * g[src(k)] (rounded to W's dtype), colsum[n] = sum_k wk[n, k],
    shift[n] = sum_k W[n, k] * in_bias[k] + bias[n] (float32). src(k): the column of
    kernel-order k in the caller's order. Grid: (cdiv(D, BLOCK_N),)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    shift = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if SRC_PQC == DST_PQC:
            src = offs_k
        elif DST_PQC:  # kernel (p, q, c) <- caller (c, p, q)
            src = (offs_k % C) * KHW + offs_k // C
        else:  # kernel (c, p, q) <- caller (p, q, c)
            src = (offs_k % KHW) * C + offs_k // KHW
        mask = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * swn + src[None, :] * swk, mask=mask, other=0.0)
        wg = w
        if HAS_G:
            gk = tl.load(g_ptr + src, mask=k_ok, other=0.0).to(tl.float32)
            wg = (w.to(tl.float32) * gk[None, :]).to(w.dtype)
        tl.store(wk_ptr + offs_n[:, None] * K + offs_k[None, :], wg, mask=mask)
        colsum += tl.sum(wg.to(tl.float32), axis=1)
        if HAS_B:
            bk = tl.load(b_ptr + src, mask=k_ok, other=0.0).to(tl.float32)
            shift += tl.sum(w.to(tl.float32) * bk[None, :], axis=1)
    if HAS_BIAS:
        shift += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(colsum_ptr + offs_n, colsum, mask=n_ok)
    tl.store(shift_ptr + offs_n, shift, mask=n_ok)


# ----------------------------------------------------------------------------
# geometry, layout and configuration


@dataclasses.dataclass(frozen=True)
class _Geometry:
    B: int
    C: int
    H: int
    W: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    Ho: int
    Wo: int

    @property
    def L(self) -> int:
        return self.Ho * self.Wo

    @property
    def K(self) -> int:
        return self.C * self.kh * self.kw

    @property
    def mask_hw(self) -> bool:
        """Whether some patch reaches outside the image (padding, or a cut edge)."""
        inside_h = self.ph == 0 and (self.Ho - 1) * self.sh + self.kh <= self.H
        inside_w = self.pw == 0 and (self.Wo - 1) * self.sw + self.kw <= self.W
        return not (inside_h and inside_w)


def _geometry(images: torch.Tensor, kernel_size, stride, padding) -> _Geometry:
    B, C, H, W = images.shape
    kh, kw = (int(v) for v in kernel_size)
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    return _Geometry(B, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo)


def _kernel_order(images: torch.Tensor, patch_order: str) -> str:
    """The patch order whose k runs along memory: pqc for channels-innermost images."""
    if images.shape[1] == 1:
        return patch_order
    return "pqc" if images.stride(1) < images.stride(3) else "cpq"


def _reorder(t: torch.Tensor | None, g: _Geometry, src: str, dst: str) -> torch.Tensor | None:
    """(..., K) in patch order src -> order dst (a copy only when they differ)."""
    if t is None or src == dst:
        return t
    lead = t.shape[:-1]
    if src == "pqc":  # (p, q, c) -> (c, p, q)
        return t.reshape(*lead, g.kh, g.kw, g.C).movedim(-1, -3).reshape(*lead, g.K)
    return t.reshape(*lead, g.C, g.kh, g.kw).movedim(-3, -1).reshape(*lead, g.K)


def _aligned(t: torch.Tensor, v: int) -> bool:
    return v * t.element_size() <= 16 and t.data_ptr() % (v * t.element_size()) == 0


def _patch_vec(images: torch.Tensor, g: _Geometry, order: str) -> int:
    """Largest v in (8, 4, 2) such that every run of v consecutive k of a patch
    (k a multiple of v) is contiguous in memory, starts at an address aligned to
    v elements and lies entirely inside or outside the image; else 1."""
    sxb, sxc, sxh, sxw = images.stride()
    for v in (8, 4, 2):
        if not _aligned(images, v) or sxb % v or sxh % v:
            continue
        if order == "cpq":
            ok = (
                sxw == 1
                and g.kw % v == 0
                and sxc % v == 0
                and g.sw % v == 0
                and g.pw % v == 0
                and (not g.mask_hw or g.W % v == 0)
            )
        else:  # k = (p, q, c): runs of C (or kw * C when pixels are adjacent) elements
            run = g.kw * g.C if sxw == g.C else g.C
            ok = (
                sxc == 1
                and run % v == 0
                and (g.sw * sxw) % v == 0  # patch columns start at (ow * sw - pw) * sxw
                and (g.pw * sxw) % v == 0
                and (run == g.kw * g.C or sxw % v == 0)
                and (not g.mask_hw or g.C % v == 0)
            )
        if ok:
            return v
    return 1


def _run_vec(t: torch.Tensor | None, dim: int, length: int) -> int:
    """Largest v in (8, 4, 2) such that runs of v elements of t along dim that
    start at multiples of v are contiguous and aligned, and length % v == 0 (so a
    tile's bound mask is uniform over each run); 8 for no tensor; else 1."""
    if t is None:
        return 8
    dim = dim % t.dim()
    for v in (8, 4, 2):
        if length % v or not _aligned(t, v):
            continue
        if t.shape[dim] > 1 and t.stride(dim) != 1:
            continue
        if any(st % v for d, (n, st) in enumerate(zip(t.shape, t.stride(), strict=True)) if d != dim and n > 1):
            continue
        return v
    return 1


def _needs_idx64(*tensors: torch.Tensor | None) -> bool:
    """Whether some element offset of these tensors does not fit in int32."""
    span = 0
    for t in tensors:
        if t is not None:
            span = max(span, sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True)))
    return span >= 2**31 - 1


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def fwd_config(
    M: int, D: int, K: int, dtype: torch.dtype, in_norm: bool, out_norm: bool, interpret: bool
) -> FwdConfig:
    """Block sizes of the forward kernel (and of the backward's recompute)."""
    if interpret:
        return FwdConfig(32, _pow2_clamp(D, 16, 64), 32, 4, 1)
    wide = dtype == torch.float32
    block_k = 32 if wide or K < 256 else 64
    stages = 2 if wide else 3
    # Register budgets were checked ahead of time with triton 3.9 (CI) and 3.6 (the GPU
    # machine): 3.6 spilled 944 B at 128 x 128 x 64 / 8 warps (P1) and 76 B at
    # 64 x 128 / 8 warps with the output norm (P2); the tiles below spill on neither
    # (32 x 128 x 64 / 4 warps spilled 16 B on sm_80 with 3.9: K steps of 32 there).
    if out_norm:  # one program per BLOCK_M whole rows
        return FwdConfig(32, _pow2_clamp(D, 32, 128), 32, 4, stages)
    if D <= 256 and not wide:  # one column tile: each patch is gathered once (T2T, D 192)
        block_n = _pow2_clamp(D, 32, 256)
        return FwdConfig(64 if block_n == 256 else 128, block_n, block_k, 8, stages)
    if not in_norm and not wide:  # P1: 64 x 256 tiles, as many MACs per tile as 128 x 128
        return FwdConfig(64, _pow2_clamp(D, 32, 256), 32, 8, stages)
    # the input norm's statistics take registers: 64 rows then (no spills for sm_80 / sm_90a)
    return FwdConfig(64 if in_norm else 128, _pow2_clamp(D, 32, 128), block_k, 8, stages)


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    block_m: int  # rows per step of the dW reduction, rows per program elsewhere
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split: int  # programs along M for dW


def bwd_config(M: int, D: int, K: int, dtype: torch.dtype, interpret: bool, sms: int) -> BwdConfig:
    """Block sizes of the backward kernels and the dW split along M."""
    if interpret:
        block_m, block_n, block_k, warps, stages = 32, _pow2_clamp(D, 16, 32), 32, 4, 1
    else:
        wide = dtype == torch.float32
        block_m, block_n, block_k = 64, _pow2_clamp(D, 32, 128), 32 if wide or K < 256 else 64
        warps, stages = 8, 2 if wide else 3
    tiles = triton.cdiv(D, block_n) * triton.cdiv(K, block_k)
    m_blocks = triton.cdiv(M, block_m)
    split = max(1, min(m_blocks, triton.cdiv(4 * sms, tiles)))
    return BwdConfig(block_m, block_n, block_k, warps, stages, split)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # only sizes the dW split; the interpreter's configs ignore it


# ----------------------------------------------------------------------------
# launches: the launchers build them; AOT_SPECS records the same ones


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_SHORT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


@dataclasses.dataclass
class _Launch:
    name: str
    kernel: object
    grid: tuple[int, ...]
    args: list
    constexprs: dict
    num_warps: int
    num_stages: int

    def run(self) -> None:
        self.kernel[self.grid](
            *self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages
        )

    def aot_spec(self) -> AotSpec:
        sig: dict[str, str] = {}
        for name, value in zip(self.kernel.arg_names, self.args, strict=False):
            if isinstance(value, torch.Tensor):
                sig[name] = "*" + _TRITON_TYPES[value.dtype]
            elif isinstance(value, int):
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            else:
                sig[name] = "fp32"
        sig.update({name: "constexpr" for name in self.constexprs})
        return AotSpec(self.name, self.kernel, sig, dict(self.constexprs), self.num_warps, self.num_stages)


def _run(launch: _Launch) -> None:
    launch.run()


def _x_args(images: torch.Tensor, g: _Geometry) -> tuple[list, list]:
    """(C, H, W, KW, KHW, SH, SW, PH, PW) and the image strides, as every kernel takes them."""
    return [g.C, g.H, g.W, g.kw, g.kh * g.kw, g.sh, g.sw, g.ph, g.pw], list(images.stride())


def _patch_constexprs(
    images: torch.Tensor, g: _Geometry, order: str, block_m: int, block_k: int, *others
) -> dict:
    """The constexprs every kernel that gathers patches takes."""
    return {
        "PQC": order == "pqc",
        "MASK_HW": g.mask_hw,
        "EVEN_M": (g.B * g.L) % block_m == 0,
        "EVEN_K": g.K % block_k == 0,
        "VEC": _patch_vec(images, g, order),
        "IDX64": _needs_idx64(images, *others),
    }


def _tag(dtype: torch.dtype, g: _Geometry, order: str, D: int) -> str:
    return f"{_SHORT[dtype]},{order},k{g.kh}s{g.sh}p{g.ph},C{g.C},D{D}"


@dataclasses.dataclass
class _Prepared:
    """Weights in the kernel's patch order, with the input norm folded in."""

    g: _Geometry
    order: str
    w: torch.Tensor  # (D, K) kernel order (W * in_weight with an input norm)
    colsum: torch.Tensor | None  # (D,) float32 rowsum(W') with an input norm
    shift: torch.Tensor | None  # (D,) bias, or float32 in_bias @ W.T + bias


def _prepare(
    images, weight, bias, in_weight, in_bias, kernel_size, stride, padding, patch_order,
    has_in_norm, interpret, launch: Callable[[_Launch], None],
) -> _Prepared:
    g = _geometry(images, kernel_size, stride, padding)
    order = _kernel_order(images, patch_order)
    if not has_in_norm:
        return _Prepared(g, order, _reorder(weight, g, patch_order, order), None, bias)
    D, K = weight.shape
    dev = weight.device
    wk = _new((D, K), dev, weight.dtype)
    colsum, shift = _new((D,), dev, torch.float32), _new((D,), dev, torch.float32)
    block_n, block_k = (16, 32) if interpret else (32, 64)
    launch(
        _Launch(
            f"patch_embed_prep[{_SHORT[weight.dtype]},{patch_order}->{order},K{K}]",
            _prep_kernel, (triton.cdiv(D, block_n),),
            [weight, in_weight if in_weight is not None else weight,
             in_bias if in_bias is not None else weight, bias if bias is not None else weight,
             wk, colsum, shift, D, K, g.C, g.kh * g.kw, weight.stride(0), weight.stride(1)],
            {"BLOCK_N": block_n, "BLOCK_K": block_k, "SRC_PQC": patch_order == "pqc",
             "DST_PQC": order == "pqc", "HAS_G": in_weight is not None,
             "HAS_B": in_bias is not None, "HAS_BIAS": bias is not None},
            4, 1,
        )
    )
    return _Prepared(g, order, wk, colsum, shift)


def _fwd_launch(
    images, prep: _Prepared, out_weight, out_bias, pos_embed, cls_token, out, stats,
    in_eps, out_eps, has_in_norm, has_out_norm, interpret,
) -> _Launch:
    g, w = prep.g, prep.w
    D, K, M = w.shape[0], g.K, g.B * g.L
    P = 0 if cls_token is None else cls_token.shape[0]
    cfg = fwd_config(M, D, K, images.dtype, has_in_norm, has_out_norm, interpret)
    f32_dummy = stats if stats is not None else prep.colsum if prep.colsum is not None else out
    pos = pos_embed if pos_embed is not None else out
    cls = cls_token if cls_token is not None else out
    ints, xs = _x_args(images, g)
    args = [
        images, w,
        prep.colsum if prep.colsum is not None else f32_dummy,
        prep.shift if prep.shift is not None else f32_dummy,
        out_weight if out_weight is not None else out,
        out_bias if out_bias is not None else out,
        pos, cls, out,
        stats if stats is not None else f32_dummy,
        M, g.L, g.Wo, D, K, *ints, P,
        *xs, w.stride(0), w.stride(1), pos.stride(0), pos.stride(-1), cls.stride(0), cls.stride(-1),
        out.stride(0), out.stride(1), out.stride(2),
        float(in_eps), float(out_eps),
    ]
    constexprs = {
        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
        **_patch_constexprs(images, g, prep.order, cfg.block_m, cfg.block_k, out),
        "EVEN_N": D % cfg.block_n == 0,
        "WVEC": _run_vec(w, 1, K),
        "OVEC": min(_run_vec(out, 2, D), _run_vec(pos_embed, 1, D)),
        "IN_NORM": bool(has_in_norm), "HAS_SHIFT": prep.shift is not None,
        "OUT_NORM": bool(has_out_norm),
        "HAS_OW": has_out_norm and out_weight is not None,
        "HAS_OB": has_out_norm and out_bias is not None,
        "HAS_POS": pos_embed is not None,
        "POS_ALL": pos_embed is not None and pos_embed.shape[0] == P + g.L,
        "HAS_CLS": P > 0,
        "WRITE_STATS": stats is not None,
        "PREC": _prec(images.dtype),
    }
    m_blocks = triton.cdiv(M, cfg.block_m)
    grid = (m_blocks,) if has_out_norm else (m_blocks * triton.cdiv(D, cfg.block_n),)
    parts = (("in", has_in_norm), ("out", has_out_norm), ("pos", pos_embed is not None), ("cls", P > 0))
    tag = "+".join(t for t, on in parts if on) or "plain"
    if stats is not None:
        tag += ",recompute"
    name = f"patch_embed_fwd[{_tag(images.dtype, g, prep.order, D)},{tag}]"
    return _Launch(name, _patch_embed_fwd_kernel, grid, args, constexprs, cfg.num_warps, cfg.num_stages)


# ----------------------------------------------------------------------------
# launchers


def _new(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Every result and scratch buffer the launchers allocate (tests poison them)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _check_launch(images: torch.Tensor) -> None:
    if images.device.type not in ("cuda", "meta") and not triton_interpret():
        raise RuntimeError(
            f"the triton patch_embed kernels need CUDA tensors (got {images.device}); "
            "set TRITON_INTERPRET=1 to run them on CPU"
        )


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
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    patch_order: str,
    in_eps: float,
    out_eps: float,
    has_in_norm: bool,
    has_out_norm: bool,
    _launch: Callable[[_Launch], None] = _run,
) -> torch.Tensor:
    """Forward launcher (see the module docstring for the contract)."""
    _check_launch(images)
    interpret = triton_interpret() and images.device.type == "cpu"
    prep = _prepare(
        images, weight, bias, in_weight, in_bias, kernel_size, stride, padding, patch_order,
        has_in_norm, interpret, _launch,
    )
    g = prep.g
    P = 0 if cls_token is None else cls_token.shape[0]
    out = _new((g.B, P + g.L, weight.shape[0]), device=images.device, dtype=images.dtype)
    if g.B == 0:
        return out
    _launch(
        _fwd_launch(
            images, prep, out_weight, out_bias, pos_embed, cls_token, out, None,
            in_eps, out_eps, has_in_norm, has_out_norm, interpret,
        )
    )
    return out


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
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    patch_order: str,
    in_eps: float,
    out_eps: float,
    has_in_norm: bool,
    has_out_norm: bool,
    grad_mask: Sequence[bool],
    _launch: Callable[[_Launch], None] = _run,
) -> tuple[torch.Tensor, ...]:
    """Backward launcher (see the module docstring for the contract)."""
    _check_launch(images)
    want = [bool(v) for v in grad_mask]
    present = [
        True, bias is not None,
        has_in_norm and in_weight is not None, has_in_norm and in_bias is not None,
        has_out_norm and out_weight is not None, has_out_norm and out_bias is not None,
        pos_embed is not None, cls_token is not None,
    ]
    want = [w and p for w, p in zip(want, present, strict=True)]
    params = (weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token)
    res = [images.new_empty((0,)) for _ in range(8)]

    g = _geometry(images, kernel_size, stride, padding)
    order = _kernel_order(images, patch_order)
    D, K, M = weight.shape[0], g.K, g.B * g.L
    P = 0 if cls_token is None else cls_token.shape[0]
    dev, dtype = images.device, images.dtype

    # position embedding and prefix tokens: sums over the batch
    if want[6]:
        rows = grad_out if pos_embed.shape[0] == P + g.L else grad_out[:, P:]
        res[6] = rows.sum(dim=0, dtype=torch.float32).to(pos_embed.dtype)
    if want[7]:
        res[7] = grad_out[:, :P].sum(dim=0, dtype=torch.float32).to(cls_token.dtype)
    if not any(want[:6]):
        return tuple(res)
    if M == 0:
        for i in range(6):
            if want[i]:
                res[i] = torch.zeros_like(params[i])
        return tuple(res)

    interpret = triton_interpret() and dev.type == "cpu"
    cfg = bwd_config(M, D, K, dtype, interpret, _sms(dev))
    ints, xs = _x_args(images, g)
    pc = _patch_constexprs(images, g, order, cfg.block_m, cfg.block_k, grad_out)
    norms = "+".join(n for n, on in (("in", has_in_norm), ("out", has_out_norm)) if on) or "plain"
    tag = f"{_tag(dtype, g, order, D)},{norms}"
    launch = lambda name, kernel, grid, args, **ce: _launch(  # noqa: E731
        _Launch(f"{name}[{tag}]", kernel, grid, args, ce, cfg.num_warps, cfg.num_stages)
    )
    w_k = _reorder(weight, g, patch_order, order)
    gin = _reorder(in_weight, g, patch_order, order) if has_in_norm else None
    bin_ = _reorder(in_bias, g, patch_order, order) if has_in_norm else None
    stats = _new((M, 2), device=dev, dtype=torch.float32) if has_in_norm else None
    m_blocks = triton.cdiv(M, cfg.block_m)

    # dy = d loss / d(patches @ W.T + bias): rows at b * sdb + (P + l) * sdt
    if has_out_norm:
        prep = _prepare(
            images, weight, bias, in_weight, in_bias, kernel_size, stride, padding, patch_order,
            has_in_norm, interpret, _launch,
        )
        y = _new((g.B, g.L, D), device=dev, dtype=torch.float32)
        _launch(
            _fwd_launch(
                images, prep, None, None, None, None, y, stats,
                in_eps, out_eps, has_in_norm, False, interpret,
            )
        )
        dy = _new((M, D), device=dev, dtype=dtype)
        parts = _new((3, m_blocks, D), device=dev, dtype=torch.float32)
        launch(
            "patch_embed_out_norm_bwd", _out_norm_bwd_kernel, (m_blocks,),
            [grad_out, y, out_weight if out_weight is not None else y, dy, parts[0], parts[1], parts[2],
             M, g.L, D, P, *grad_out.stride(), float(out_eps)],
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_OW=out_weight is not None,
            IDX64=pc["IDX64"], GVEC=_run_vec(grad_out, 2, D),
            YVEC=min(_run_vec(y, 2, D), _run_vec(dy, 1, D)),
        )
        sums = parts.sum(dim=1)
        for i, row in ((4, 0), (5, 1), (1, 2)):
            if want[i]:
                res[i] = sums[row].to(params[i].dtype, copy=True)  # no aliasing results
        dy_t, dyP, (sdb, sdt, sdd) = dy, 0, (g.L * D, D, 1)
    else:
        if has_in_norm:
            launch(
                "patch_embed_stats", _patch_stats_kernel, (m_blocks,),
                [images, stats, M, g.L, g.Wo, K, *ints, *xs, float(in_eps)],
                BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, **pc,
            )
        if want[1]:
            res[1] = grad_out[:, P:].sum(dim=(0, 1), dtype=torch.float32).to(bias.dtype)
        dy_t, dyP, (sdb, sdt, sdd) = grad_out, P, grad_out.stride()
    dvec = _run_vec(dy_t, -1, D)

    if want[0]:
        blocks_per_split = triton.cdiv(m_blocks, cfg.split)
        split = triton.cdiv(m_blocks, blocks_per_split)
        ws = _new((split, D, K), device=dev, dtype=torch.float32)
        launch(
            "patch_embed_dw", _dw_kernel,
            (triton.cdiv(D, cfg.block_n) * triton.cdiv(K, cfg.block_k), split),
            [images, dy_t, stats if stats is not None else images,
             gin if gin is not None else images, bin_ if bin_ is not None else images, ws,
             M, g.L, g.Wo, D, K, *ints, dyP, *xs, sdb, sdt, sdd, blocks_per_split],
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **pc, DVEC=dvec,
            IN_NORM=bool(has_in_norm), HAS_GIN=gin is not None, HAS_BIN=bin_ is not None,
            PREC=_prec(dtype),
        )
        res[0] = _reorder(ws.sum(dim=0), g, order, patch_order).to(weight.dtype)
    if want[2] or want[3]:
        dparts = _new((2, m_blocks, K), device=dev, dtype=torch.float32)
        launch(
            "patch_embed_dxn", _dxn_kernel, (m_blocks * triton.cdiv(K, cfg.block_k),),
            [images, dy_t, w_k, stats, dparts[0], dparts[1],
             M, g.L, g.Wo, D, K, *ints, dyP, *xs, sdb, sdt, sdd, w_k.stride(0), w_k.stride(1)],
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **pc, DVEC=dvec,
            WVEC=_run_vec(w_k, 1, K), PREC=_prec(dtype),
        )
        dsum = _reorder(dparts.sum(dim=1), g, order, patch_order)
        for i in (2, 3):
            if want[i]:
                res[i] = dsum[i - 2].to(params[i].dtype, copy=True)
    return tuple(res)


# ----------------------------------------------------------------------------
# ahead-of-time specialisations


def _aot_specs() -> list[AotSpec]:
    """What the launchers launch for the WORKLOADS.md shapes (batch 256, 224 x 224:
    P1 ViT-B/16 + cls + pos, P2 the same with both norms in vit-pytorch's patch
    order, P3 T2T's soft split 7/4/2 + LN + kqv 147 -> 192, and T2T-ViT-14's two
    later soft splits), forward and backward, float16 and bfloat16, built on meta
    tensors with the GPU configuration."""
    specs: dict[str, AotSpec] = {}
    meta = torch.device("meta")

    def record(launch: _Launch) -> None:
        specs.setdefault(launch.name, launch.aot_spec())

    def launch(images, k, s, p, D, order, in_n, out_n, pos_rows, P) -> None:
        """Record the forward and backward launches for one configuration."""

        def t(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device=meta, dtype=images.dtype)

        B, C, H, _ = images.shape
        K, L = C * k * k, ((H + 2 * p - k) // s + 1) ** 2
        args = (
            images, t(D, K), t(D), t(K) if in_n else None, t(K) if in_n else None,
            t(D) if out_n else None, t(D) if out_n else None,
            t(pos_rows, D) if pos_rows else None, t(P, D) if P else None,
            (k, k), (s, s), (p, p), order, 1e-5, 1e-5, in_n, out_n,
        )
        patch_embed_fwd(*args, _launch=record)
        patch_embed_bwd(t(B, P + L, D), *args, [True] * 8, _launch=record)

    cases = {  # kernel, stride, padding, D, patch order, in norm, out norm, pos rows, prefix tokens
        "P1": (16, 16, 0, 768, "cpq", False, False, 197, 1),
        "P2": (16, 16, 0, 768, "pqc", True, True, 197, 1),
        "P3": (7, 4, 2, 192, "cpq", True, False, 0, 0),
    }
    for dtype, channels_last in ((torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        images = torch.empty((256, 3, 224, 224), device=meta, dtype=dtype)
        if channels_last:  # the kernel then gathers in "pqc" order
            images = images.to(memory_format=torch.channels_last)
        for case in cases.values():
            launch(images, *case)
    # T2T-ViT-14's later soft splits (vitkernels.replace's FusedT2TModule): 3/2/1 on
    # 64-channel token maps, views of (B, N, 64) tokens (channels-last strides);
    # the second with attention2's norm1 + kqv (576 -> 192), the third with the
    # project layer (576 -> 384), class token and positions
    t2t = {"T2T-2": (56, 192, True, 0, 0), "T2T-3": (28, 384, False, 197, 1)}
    for dtype in (torch.float16, torch.bfloat16):
        for side, D, in_n, pos_rows, P in t2t.values():
            tokens = torch.empty((256, side * side, 64), device=meta, dtype=dtype)
            images = tokens.transpose(1, 2).unflatten(2, (side, side))
            launch(images, 3, 2, 1, D, "cpq", in_n, False, pos_rows, P)
    return list(specs.values())


AOT_SPECS: list[AotSpec] = _aot_specs()
