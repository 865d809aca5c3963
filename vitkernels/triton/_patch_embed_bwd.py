"""Backward kernels of ``patch_embed`` (launchers: ``patch_embed.py``).

* ``_patch_stats_kernel``: each patch's input-norm statistics (mu, rstd).
* ``_out_norm_bwd_kernel``: the output norm's backward, row-wise, with column
  partial sums for its affine and the linear bias.
* ``_dw_kernel``: dW = dy.T @ in_norm(patches), split along the rows.
* ``_dxn_kernel``: dxn = dy @ W with the normalised patch in the epilogue (the
  input norm's affine gradients).
* ``_dw_dxn_kernel``: both in one pass over the patches (input norm, D in one
  tile).
* ``_fold_kernel``: every gradient's final sum in one launch: the float32 partial
  sums of the kernels above over their row splits, and grad_out over the batch
  (positions, prefix tokens), each written in its parameter's dtype.

dW and dxn store their partials with k in the result's patch order (the caller's,
which may differ from the kernel's gathering order), so the fold is a plain sum.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vitkernels.triton._common import hint as _hint
from vitkernels.triton._common import mask2 as _mask2
from vitkernels.triton._patch_embed_fwd import (
    _chan_update,
    _idx,
    _in_norm_stats,
    _k_advance,
    _k_deltas,
    _k_digits,
    _patch_rows,
    _patch_tile,
    _row_shift,
)


@triton.jit
def _k_result(offs_k, c, p, q, C, KW, KHW, PQC: tl.constexpr, REORDER: tl.constexpr):
    """Index of k (kernel order, digits c, p, q) in the result's patch order: the
    other order ("cpq" <-> "pqc") with REORDER, else k itself."""
    if not REORDER:
        return offs_k
    if PQC:  # the result is "cpq"
        return c * KHW + p * KW + q
    return (p * KW + q) * C + c


@triton.jit
def _grid_tile_rows(
    t, L, Hout, Wout, tiles_h, tiles_w, SH, SW, PH, PW, sxb, sxh, sxw,
    BLOCK_M: tl.constexpr, TW: tl.constexpr, IDX64: tl.constexpr,
):
    """``_patch_rows`` for a block of patches that is a (BLOCK_M // TW) x TW tile of
    the patch grid (tile t, row-major over images and the grid's tiles): a row's
    place in the tile is a shift and a mask of its index, the divisions are the
    tile's (scalars); rows outside the grid are masked."""
    per_img = tiles_h * tiles_w
    b = t // per_img
    r = t - b * per_img
    th = r // tiles_w
    i = tl.arange(0, BLOCK_M)
    oh = th * (BLOCK_M // TW) + i // TW
    ow = (r - th * tiles_w) * TW + i % TW
    row_ok = (oh < Hout) & (ow < Wout)
    l = oh * Wout + ow
    offs_m = b * L + l
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    row_base = _idx(b, IDX64) * sxb + ih0 * sxh + iw0 * sxw  # may point into the padding
    return offs_m, row_ok, b, l, ih0, iw0, row_base


@triton.jit
def _patch_stats_kernel(
    x_ptr, stats_ptr, L, Hout, Wout, K, C, H, W, KW, KHW, SH, SW, PH, PW,
    sxb, sxc, sxh, sxw, tiles_h, tiles_w, in_eps,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, TW: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IDX64: tl.constexpr,
):
    """stats[m] = (mu, rstd) of patch m over K, as the forward kernel computes them,
    for one (BLOCK_M // TW) x TW tile of the patch grid (``_grid_tile_rows``)."""
    offs_m, row_ok, b, l, ih0, iw0, row_base = _grid_tile_rows(
        tl.program_id(0), L, Hout, Wout, tiles_h, tiles_w, SH, SW, PH, PW, sxb, sxh, sxw, BLOCK_M, TW, IDX64
    )
    shift = _row_shift(x_ptr, row_base, ih0, iw0, row_ok, H, W, MASK_HW)
    s1 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # element-wise, reduced after the loop
    s2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    c, p, q = _k_digits(tl.arange(0, BLOCK_K), C, KW, KHW, PQC)
    dc, dp, dq = _k_deltas(C, KW, KHW, BLOCK_K, PQC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = _patch_tile(
            x_ptr, row_base, ih0, iw0, row_ok, c, p, q, k_ok, H, W, sxc, sxh, sxw,
            MASK_HW, EVEN_M, EVEN_K, VEC,
        ).to(tl.float32) - shift[:, None]
        if not EVEN_K:
            a = tl.where(k_ok[None, :], a, 0.0)
        s1 += a
        s2 += a * a
        c, p, q = _k_advance(c, p, q, dc, dp, dq, C, KW, KHW, PQC)
    s1 = tl.sum(s1, axis=1)
    s2 = tl.sum(s2, axis=1)
    mean_d, rstd = _in_norm_stats(s1, s2, K, in_eps)
    tl.store(stats_ptr + offs_m * 2, shift + mean_d, mask=row_ok)
    tl.store(stats_ptr + offs_m * 2 + 1, rstd, mask=row_ok)


@triton.jit
def _out_norm_bwd_kernel(
    g_ptr, y_ptr, ostats_ptr, ow_ptr, dy_ptr, dow_part, dob_part, dbias_part,
    M, L, D, P, sgb, sgt, sgd, out_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_OW: tl.constexpr, IDX64: tl.constexpr,
    GVEC: tl.constexpr, YVEC: tl.constexpr, HAS_OSTATS: tl.constexpr,
):
    """Backward of the output layer norm for BLOCK_M patch rows.

    y (M, D): the pre-norm tokens, as the forward saved them (its dtype) or recomputed
    (float32); with HAS_OSTATS the norm's (mean, rstd) per row (float32, (M, 2), saved
    by the forward), else taken from y here; g: grad_out's patch rows.
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
    if HAS_OSTATS:
        mean = tl.load(ostats_ptr + offs_m * 2, mask=row_ok, other=0.0)
        rstd = tl.load(ostats_ptr + offs_m * 2 + 1, mask=row_ok, other=0.0)
    else:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < D
            y_mask = _mask2(row_ok, n_ok, 1, YVEC)
            y = tl.load(_hint(y_rows[:, None], offs_n[None, :], 1, YVEC), mask=y_mask, other=0.0).to(tl.float32)
            mean, m2 = _chan_update(mean, m2, y, n_ok, n0)
        rstd = 1.0 / tl.sqrt(m2 / D + out_eps)
    a1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        mask = _mask2(row_ok, n_ok, 1, YVEC)
        y = tl.load(_hint(y_rows[:, None], offs_n[None, :], 1, YVEC), mask=mask, other=0.0).to(tl.float32)
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
        y = tl.load(_hint(y_rows[:, None], offs_n[None, :], 1, YVEC), mask=mask, other=0.0).to(tl.float32)
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
    x_ptr, stats_ptr, gin_ptr, bin_ptr, row_base, ih0, iw0, row_ok, offs_m, offs_k, kr,
    c, p, q, K, H, W, sxc, sxh, sxw,
    MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IN_NORM: tl.constexpr, HAS_GIN: tl.constexpr, HAS_BIN: tl.constexpr,
):
    """in_norm(patches) tile in float32 (raw patches without IN_NORM); zero where
    k >= K or the row is past M. Also returns xhat (the normalised patch). kr: k's
    index in the affine's (the caller's) patch order."""
    x = _patch_tile(
        x_ptr, row_base, ih0, iw0, row_ok, c, p, q, offs_k < K, H, W, sxc, sxh, sxw,
        MASK_HW, EVEN_M, EVEN_K, VEC,
    ).to(tl.float32)
    if IN_NORM:
        mu = tl.load(stats_ptr + offs_m * 2, mask=row_ok, other=0.0)
        rstd = tl.load(stats_ptr + offs_m * 2 + 1, mask=row_ok, other=0.0)
        return _in_norm_tile(x, mu, rstd, row_ok, offs_k < K, gin_ptr, bin_ptr, kr, HAS_GIN, HAS_BIN)
    return x, x


@triton.jit
def _in_norm_tile(x, mu, rstd, row_ok, k_ok, gin_ptr, bin_ptr, kr, HAS_GIN: tl.constexpr, HAS_BIN: tl.constexpr):
    """(in_norm(x), xhat) of a float32 patch tile x from its rows' (mu, rstd); zero
    where a row or k is not valid. kr: k's index in the affine's patch order."""
    valid = row_ok[:, None] & k_ok[None, :]
    xhat = tl.where(valid, (x - mu[:, None]) * rstd[:, None], 0.0)
    xn = xhat
    if HAS_GIN:
        xn = xn * tl.load(gin_ptr + kr, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIN:
        xn = tl.where(valid, xn + tl.load(bin_ptr + kr, mask=k_ok, other=0.0).to(tl.float32)[None, :], 0.0)
    return xn, xhat


@triton.jit
def _dw_kernel(
    x_ptr, dy_ptr, stats_ptr, gin_ptr, bin_ptr, ws_ptr, bias_ptr,
    M, L, Wout, D, K, C, H, W, KW, KHW, SH, SW, PH, PW, P,
    sxb, sxc, sxh, sxw, sdb, sdt, sdd, blocks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IDX64: tl.constexpr, DVEC: tl.constexpr,
    IN_NORM: tl.constexpr, HAS_GIN: tl.constexpr, HAS_BIN: tl.constexpr, PREC: tl.constexpr,
    REORDER: tl.constexpr, BIAS: tl.constexpr, RCP_ROWS: tl.constexpr,
):
    """ws[s, n, k] = sum over split s's rows m of dy[m, n] * in_norm(patch m)[k],
    k in the result's patch order; with BIAS, one more k tile per column tile sums
    dy instead: bias[s, n] = sum over split s's rows m of dy[m, n].

    Grid: (cdiv(D, BLOCK_N) * (cdiv(K, BLOCK_K) + BIAS), SPLIT). dy rows at
    dy_ptr + b * sdb + (P + l) * sdt (grad_out's patch rows or a (M, D) buffer).
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_kt = tl.cdiv(K, BLOCK_K)
    num_k = num_kt + BIAS
    pid_k = pid % num_k
    offs_n = (pid // num_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    mb0 = pid_s * blocks_per_split
    mb1 = tl.minimum(mb0 + blocks_per_split, tl.cdiv(M, BLOCK_M))
    # the bias tile (only with BIAS) runs the first loop, the others the second
    is_bias = pid_k == num_kt
    if BIAS:
        bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for mbb in range(mb0 * 4, tl.where(is_bias, mb1, mb0) * 4):  # quarter row blocks
            offs_m = mbb * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)
            dy_rows = dy_ptr + _idx(offs_m // L, IDX64) * sdb + (P + offs_m % L) * sdt
            dyt = tl.load(
                _hint(dy_rows[None, :], offs_n[:, None] * sdd, DVEC, 1),
                mask=_mask2(n_ok, offs_m < M, DVEC, 1),
                other=0.0,
            )
            bacc += tl.sum(dyt.to(tl.float32), axis=1)
        if is_bias:
            tl.store(bias_ptr + pid_s * D + offs_n, bacc, mask=n_ok)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    c, p, q = _k_digits(offs_k, C, KW, KHW, PQC)
    kr = _k_result(offs_k, c, p, q, C, KW, KHW, PQC, REORDER)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    mb_end = mb1
    if BIAS:
        mb_end = tl.where(is_bias, mb0, mb1)
    for mb in range(mb0, mb_end):
        offs_m, row_ok, b, l, ih0, iw0, row_base = _patch_rows(
            mb, M, L, Wout, SH, SW, PH, PW, sxb, sxh, sxw, BLOCK_M, IDX64, RCP_ROWS
        )
        dy_rows = dy_ptr + _idx(b, IDX64) * sdb + (P + l) * sdt
        dyt = tl.load(
            _hint(dy_rows[None, :], offs_n[:, None] * sdd, DVEC, 1),
            mask=_mask2(n_ok, row_ok, DVEC, 1),
            other=0.0,
        )  # (BLOCK_N, BLOCK_M) = dy.T
        xn, xhat = _norm_patch_tile(
            x_ptr, stats_ptr, gin_ptr, bin_ptr, row_base, ih0, iw0, row_ok, offs_m, offs_k, kr,
            c, p, q, K, H, W, sxc, sxh, sxw, MASK_HW, EVEN_M, EVEN_K, VEC,
            IN_NORM, HAS_GIN, HAS_BIN,
        )
        acc = tl.dot(dyt, xn.to(dyt.dtype), acc, input_precision=PREC)
    ws = ws_ptr + _idx(pid_s, IDX64) * D * K
    tl.store(
        ws + offs_n[:, None] * K + kr[None, :],
        acc,
        mask=n_ok[:, None] & (offs_k < K)[None, :],  # all false in the bias tile
    )


@triton.jit
def _dxn_kernel(
    x_ptr, dy_ptr, w_ptr, stats_ptr, dg_part, db_part,
    M, L, Wout, D, K, C, H, W, KW, KHW, SH, SW, PH, PW, P,
    sxb, sxc, sxh, sxw, sdb, sdt, sdd, swn, swk, blocks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IDX64: tl.constexpr, DVEC: tl.constexpr, WVEC: tl.constexpr,
    PREC: tl.constexpr, REORDER: tl.constexpr, RCP_ROWS: tl.constexpr,
):
    """dxn = dy @ W for BLOCK_K columns (W in the kernel's patch order) over split
    s's row blocks; column partial
    sums over those rows of dxn * xhat (-> in_norm weight) and dxn (-> in_norm bias),
    element-wise per row block and reduced once at the end (k in the result's
    patch order).

    Grid: (cdiv(K, BLOCK_K), SPLIT).
    """
    pid_s = tl.program_id(1)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    c, p, q = _k_digits(offs_k, C, KW, KHW, PQC)
    kr = _k_result(offs_k, c, p, q, C, KW, KHW, PQC, REORDER)  # k in the results' order
    dg = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    mb0 = pid_s * blocks_per_split
    mb1 = tl.minimum(mb0 + blocks_per_split, tl.cdiv(M, BLOCK_M))
    for mb in range(mb0, mb1):
        offs_m, row_ok, b, l, ih0, iw0, row_base = _patch_rows(
            mb, M, L, Wout, SH, SW, PH, PW, sxb, sxh, sxw, BLOCK_M, IDX64, RCP_ROWS
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
            x_ptr, stats_ptr, x_ptr, x_ptr, row_base, ih0, iw0, row_ok, offs_m, offs_k, kr,
            c, p, q, K, H, W, sxc, sxh, sxw, MASK_HW, EVEN_M, EVEN_K, VEC,
            True, False, False,
        )
        dg += acc * xhat
        db += acc  # rows past M and k >= K hold zeros (dy and W masked)
    tl.store(dg_part + pid_s * K + kr, tl.sum(dg, axis=0), mask=k_ok)
    tl.store(db_part + pid_s * K + kr, tl.sum(db, axis=0), mask=k_ok)


@triton.jit
def _dw_dxn_kernel(
    x_ptr, dy_ptr, w_ptr, stats_ptr, gin_ptr, bin_ptr, ws_ptr, bias_ptr, dg_part, db_part,
    L, Hout, Wout, D, K, C, H, W, KW, KHW, SH, SW, PH, PW, P,
    sxb, sxc, sxh, sxw, sdb, sdt, sdd, swn, swk, tiles_h, tiles_w, num_tiles, blocks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TW: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IDX64: tl.constexpr, DVEC: tl.constexpr, WVEC: tl.constexpr,
    HAS_GIN: tl.constexpr, HAS_BIN: tl.constexpr, PREC: tl.constexpr, REORDER: tl.constexpr,
    DW: tl.constexpr, BIAS: tl.constexpr, DXN: tl.constexpr,
):
    """dW and dxn of ``_dw_kernel`` and ``_dxn_kernel`` in one pass (input norm, every
    column in one tile: BLOCK_N >= D): each patch tile is gathered and normalised once
    per (row block, k tile) and feeds both GEMMs,

      ws[s, n, k] = sum_m dy[m, n] * in_norm(patch m)[k]              (DW)
      bias[s, n]  = sum_m dy[m, n]: the column k = K of the same GEMM, whose
                    patch entries are ones (BIAS; K is padded past it)
      dg[s, k], db[s, k] = sum_m dxn[m, k] * xhat[m, k], sum_m dxn[m, k],
                    dxn = dy @ W (W in the kernel's patch order)       (DXN)

    k in the result's patch order. The row blocks are (BLOCK_M // TW) x TW tiles of
    the patch grid (``_grid_tile_rows``; EVEN_M: every tile inside the grid); split
    s takes blocks_per_split of the num_tiles. Grid: (cdiv(K + BIAS, BLOCK_K), SPLIT).
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    c, p, q = _k_digits(offs_k, C, KW, KHW, PQC)
    kr = _k_result(offs_k, c, p, q, C, KW, KHW, PQC, REORDER)
    if DXN:  # (BLOCK_N, BLOCK_K), the same for every row block
        w = tl.load(
            _hint(w_ptr, offs_n[:, None] * swn + offs_k[None, :] * swk, 1, WVEC),
            mask=_mask2(n_ok, k_ok, 1, WVEC),
            other=0.0,
        )
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dg = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # element-wise, reduced after the loop
    db = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    # A row block is a TH x TW tile of the patch grid. The k tile is the program's, so
    # every row's and element's offset is the tile's (scalar) plus a loop-invariant
    # tensor, made here; the loop only adds the scalars (a third of its instructions
    # went to the rows' indices when it recomputed them per tile).
    TH: tl.constexpr = BLOCK_M // TW
    ti = tl.arange(0, BLOCK_M) // TW  # the row's place in the tile
    tj = tl.arange(0, BLOCK_M) % TW
    rl = ti * Wout + tj  # l - the tile's first l
    rl_dy = rl * sdt
    # (BLOCK_M, BLOCK_K): the element's image offset and (ih, iw) less the tile's
    x_off = (ti * (SH * sxh) + tj * (SW * sxw))[:, None] + (c * sxc + p * sxh + q * sxw)[None, :]
    ih_off = (ti * SH)[:, None] + tl.where(k_ok, p, 1 << 30)[None, :]  # k >= K: out along h
    iw_off = (tj * SW)[:, None] + q[None, :]
    if EVEN_M:
        row_ok = tl.full((BLOCK_M,), 1, tl.int1)
    # the first tile's (image, tile row, tile column); the loop advances them
    mb0 = pid_s * blocks_per_split
    mb1 = tl.minimum(mb0 + blocks_per_split, num_tiles)
    per_img = tiles_h * tiles_w
    b = mb0 // per_img
    th = (mb0 - b * per_img) // tiles_w
    tw = mb0 - b * per_img - th * tiles_w
    for mb in range(mb0, mb1):  # noqa: B007 (the estimate counts the loop by its name)
        oh0 = th * TH
        ow0 = tw * TW
        l0 = oh0 * Wout + ow0
        ih0 = oh0 * SH - PH
        iw0 = ow0 * SW - PW
        if not EVEN_M:
            row_ok = (ti < Hout - oh0) & (tj < Wout - ow0)
        dy = tl.load(
            _hint((dy_ptr + (_idx(b, IDX64) * sdb + (P + l0) * sdt) + rl_dy)[:, None], offs_n[None, :] * sdd, 1, DVEC),
            mask=_mask2(row_ok, n_ok, 1, DVEC),
            other=0.0,
        )  # (BLOCK_M, BLOCK_N)
        x_ptrs = _hint(x_ptr + (_idx(b, IDX64) * sxb + ih0 * sxh + iw0 * sxw), x_off, 1, VEC)
        if MASK_HW:
            # one unsigned compare per bound and element (negative coordinates wrap)
            mask = ((ih0 + ih_off).to(tl.uint32) < tl.cast(H, tl.uint32)) & (
                (iw0 + iw_off).to(tl.uint32) < tl.cast(W, tl.uint32)
            )
            if not EVEN_M:
                mask = mask & row_ok[:, None]
            if VEC > 1:
                mask = tl.max_constancy(mask, [1, VEC])
            x = tl.load(x_ptrs, mask=mask, other=0.0)
        elif EVEN_M and EVEN_K:
            x = tl.load(x_ptrs)
        elif EVEN_K:
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=_mask2(row_ok, k_ok, 1, VEC), other=0.0)
        stats_rows = stats_ptr + (b * L + l0) * 2 + rl * 2
        mu = tl.load(stats_rows, mask=row_ok, other=0.0)
        rstd = tl.load(stats_rows + 1, mask=row_ok, other=0.0)
        xn, xhat = _in_norm_tile(x.to(tl.float32), mu, rstd, row_ok, k_ok, gin_ptr, bin_ptr, kr, HAS_GIN, HAS_BIN)
        # the next tile: a mixed-radix add on (b, th, tw)
        tw += 1
        wrap = tw == tiles_w
        tw = tl.where(wrap, 0, tw)
        th = tl.where(wrap, th + 1, th)
        wrap = th == tiles_h
        th = tl.where(wrap, 0, th)
        b = tl.where(wrap, b + 1, b)
        if DW or BIAS:
            if BIAS:
                xn = tl.where((offs_k == K)[None, :], 1.0, xn)
            acc = tl.dot(tl.trans(dy), xn.to(dy.dtype), acc, input_precision=PREC)
        if DXN:
            dxn = tl.dot(dy, w, input_precision=PREC)
            dg += dxn * xhat
            db += dxn  # rows past M and k >= K hold zeros (dy and W masked)
    if DW:
        ws = ws_ptr + _idx(pid_s, IDX64) * D * K
        tl.store(ws + offs_n[:, None] * K + kr[None, :], acc, mask=n_ok[:, None] & k_ok[None, :])
    if BIAS:
        if pid_k == K // BLOCK_K:  # the tile that holds k = K
            bias = tl.sum(tl.where((offs_k == K)[None, :], acc, 0.0), axis=1)
            tl.store(bias_ptr + pid_s * D + offs_n, bias, mask=n_ok)
    if DXN:
        tl.store(dg_part + pid_s * K + kr, tl.sum(dg, axis=0), mask=k_ok)
        tl.store(db_part + pid_s * K + kr, tl.sum(db, axis=0), mask=k_ok)


@triton.jit
def _fold_kernel(
    ws_ptr, g_ptr, d0, d1, d2, d3, d4, d5, d6, d7,
    n0, n1, n2, n3, n4, n5, n6, n7, o0, o1, o2, o3, o4, o5, r0, r1, r2, r3, r4, r5,
    B, D, T6, sgb, sgt, sgd,
    BLOCK: tl.constexpr, GVEC: tl.constexpr, IDX64: tl.constexpr,
):
    """Result i (i < 8, n_i elements, 0 when not wanted) gets BLOCK elements per
    program, in a float32 sum in a fixed order (deterministic), stored in d_i's dtype:

      i < 6:  d_i[e] = sum_{r < r_i} ws[o_i + r * n_i + e]    (the kernels' partials)
      i = 6:  d6[t, d] = sum_b grad_out[b, T6 + t, d]          (positions)
      i = 7:  d7[t, d] = sum_b grad_out[b, t, d]               (prefix tokens)
    """
    pid = tl.program_id(0)
    # the result this program works on: the last one whose first block is <= pid
    first, dst, n, o, r = pid * 0, d0, n0, o0, r0
    first1 = tl.cdiv(n0, BLOCK)
    if pid >= first1:
        first, dst, n, o, r = first1, d1, n1, o1, r1
    first2 = first1 + tl.cdiv(n1, BLOCK)
    if pid >= first2:
        first, dst, n, o, r = first2, d2, n2, o2, r2
    first3 = first2 + tl.cdiv(n2, BLOCK)
    if pid >= first3:
        first, dst, n, o, r = first3, d3, n3, o3, r3
    first4 = first3 + tl.cdiv(n3, BLOCK)
    if pid >= first4:
        first, dst, n, o, r = first4, d4, n4, o4, r4
    first5 = first4 + tl.cdiv(n4, BLOCK)
    if pid >= first5:
        first, dst, n, o, r = first5, d5, n5, o5, r5
    first6 = first5 + tl.cdiv(n5, BLOCK)
    if pid >= first6:
        first, dst, n = first6, d6, n6
    first7 = first6 + tl.cdiv(n6, BLOCK)
    if pid >= first7:
        first, dst, n = first7, d7, n7
    e = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    e_ok = e < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if pid < first6:
        src = ws_ptr + _idx(o, IDX64) + e
        for s in range(0, r):
            acc += tl.load(src + _idx(s, IDX64) * n, mask=e_ok, other=0.0)
    else:
        t0 = tl.where(pid >= first7, 0, T6)
        rows = g_ptr + _idx(t0 + e // D, IDX64) * sgt + (e % D) * sgd
        for b in range(0, B):
            ptrs = _hint(rows[None, :], _idx(b, IDX64) * sgb, 1, GVEC)  # (1, BLOCK)
            acc += tl.sum(tl.load(ptrs, mask=e_ok[None, :], other=0.0).to(tl.float32), axis=0)
    tl.store(dst + e, acc.to(dst.dtype.element_ty), mask=e_ok)
