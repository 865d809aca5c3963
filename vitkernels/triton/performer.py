"""Triton kernels for ``performer_attention`` (T2T-ViT's Performer single attention).

Launcher contract
=================

The CUDA extension mirrors these two launchers op for op
(``torch.ops.vitkernels_C.performer_attention_fwd`` / ``..._bwd``): identical
positional arguments, identical results (dtypes, shapes, meaning).

``performer_attention_fwd(q, k, v, w, eps) -> (y, lks, vbar)``
    q, k, v  Tensor (B, T, E), one dtype (float16, bfloat16 or float32), any
             strides (typically views of one (B, T, 3E) kqv projection), T >= 1,
             1 <= E <= 64 (vitkernels.ops.performer.MAX_E)
    w        Tensor (M, E), float16, bfloat16 or float32, any strides,
             1 <= M <= 32 (MAX_M): the kernels keep (M, E) tiles in registers
    eps      float >= 0
    y        Tensor (B, T, E), q.dtype, contiguous: the op's result
    lks      Tensor (B, M), float32, contiguous:
             lks[b, m] = log sum_t exp(k[b,t] . w[m] - |k[b,t]|^2 / 2)
    vbar     Tensor (B, M, E), float32, contiguous:
             vbar[b, m] = sum_t softmax_t(k[b,t] . w[m] - |k[b,t]|^2 / 2) v[b,t]
    (lks and vbar are the per-batch key statistics the backward reuses.)

``performer_attention_bwd(dy, q, k, v, w, lks, vbar, eps, w_grad) -> (dq, dk, dv, dw)``
    dy       Tensor (B, T, E), q.dtype, any strides (stride 0 allowed)
    q, k, v, w, eps   as given to the forward; lks, vbar as it returned them
    w_grad   bool: whether dw is wanted
    dq, dk, dv   Tensor (B, T, E), q.dtype, contiguous
    dw       Tensor (M, E), w.dtype, contiguous (zeros when w_grad is False)

Math
====

With a[t, m] = x_t . w_m - |x_t|^2 / 2 (x = q or k), phi(x) = exp(a) / sqrt(M), the
reference computes y_t = phi(q_t) (phi(k)^T v) / (phi(q_t) . sum_t phi(k) + eps).
The kernels compute the same number in a form whose exp() never overflows:

    lks[m]  = log sum_t exp(ak[t, m])                 (per key feature m)
    vbar[m] = sum_t exp(ak[t, m] - lks[m]) v_t        (a convex combination of v)
    l[t, m] = aq[t, m] + lks[m],  s_t = max_m l[t, m]
    p[t, m] = exp(l[t, m] - s_t)                      (in [0, 1], max exactly 1)
    y_t     = sum_m p[t, m] vbar[m] / (sum_m p[t, m] + exp(log(eps * M) - s_t))

Why this is the reference's number. sum_t phi(k_t)[m] = exp(lks[m]) / sqrt(M) and
(phi(k)^T v)[:, m] = exp(lks[m]) / sqrt(M) * vbar[m], so the reference's numerator
and the first term of its denominator are exp(s_t) / M times those above;
dividing the whole ratio by exp(s_t) / M turns eps into eps * M * exp(-s_t).
Only factors common to numerator and denominator are divided out: per token,
exp(s_t), which comes from phi(q_t), and per key feature m, exp(max_t ak[t, m])
inside lks, which multiplies both sum_t phi(k)[m] and (phi(k)^T v)[:, m] (one
shift common to all m, per batch element, would cancel as well; a shift per m is
as exact and keeps every feature's key sum from underflowing when the features'
scales differ). eps itself is not divided out: it is kept, exactly, as
exp(log(eps * M) - s_t).

Why it is finite. Every exponent is <= 0 except log(eps * M) - s_t: p and
exp(ak - lks) lie in [0, 1], sum_m p >= 1 (the maximal term is exp(0) = 1),
|vbar| <= max_t |v_t|. So the numerator is at most M * max|v| and the
denominator at least 1: y is finite for finite inputs, whatever their norms.
When log(eps * M) - s_t overflows float32 (s_t < log(eps * M) - 88.7), the
denominator is +inf and y = 0, while the exact value is below
M * max|v| * 3e-39 in size (eps dominates a denominator whose other term has
underflowed): 0 is its float32 rounding. Where the float64 reference computes
its phi's without under- or overflow, both compute the same ratio and agree to
rounding; where it does not (0 / eps, inf / inf), this returns the value of the
exact expression, which the reference approximates or loses.

Precision. Products are accumulated in float32. Dots with an input-dtype
operand (q, k, v, dy) run on tensor cores in that dtype; w, which sets the
exponent, is split into hi + lo parts of the input dtype (a float32 w with
16-bit inputs), so x . w carries ~16-22 bits instead of 8-11; so is vbar in the
forward. Probabilities p, exp(ak - lks) and the backward's intermediates are
rounded to the input dtype for their dots (as FlashAttention does), and each
normaliser is summed from the same rounded values it divides; for float16, the
backward's intermediates (sums over tokens, which loss scaling can push past
65504) are first divided by a power of two taken from their maximum. Float32 inputs
use exact float32 dots (input_precision="ieee", CUDA-core FMAs; tf32x3 needs
more registers than sm_80 has for these tiles).

Kernels and passes
==================

forward: ``_fwd_kv_kernel`` (grid B x n_chunks): one pass over a chunk of the
tokens computing per-chunk column maxima, exp-sums and exp-weighted sums of v
(online, like FlashAttention's row statistics, here per feature column);
``_fwd_q_kernel`` (same grid): merges the chunks' partials of its batch element
in chunk order (a deterministic reduction, no atomics), writes lks and vbar
(chunk 0 only) and produces y for its chunk of tokens.

backward: ``_bwd_q_kernel``: dq, and per-chunk partials of d vbar, d lks and
(w_grad) d w from the query side; ``_bwd_kv_kernel``: merges those partials in
chunk order, computes dk, dv and the key side's d w partials. dw is the sum of
all partials, reduced in a fixed order by torch.sum.

Operands transposed for a dot (v^T in the forward's key pass, dy^T and q^T, k^T in the
backward's sums over tokens) come from ``tl.trans`` of the row tiles where those rows
can be copied to shared memory asynchronously (16-bit, E a multiple of 16, aligned
rows: every model), else they are loaded transposed from memory (TRANS_LOAD,
``_trans_loads``): the ``tl.trans`` form there made a wgmma read a transposed view of a
register-stored tile, and an H200 gave wrong results for it (bench/NOTES.md,
2026-12-04).

With l and s_t as above, r = p / Z (Z the denominator) and g = dy:
    dl[t, m] = r[t, m] (g_t . vbar[m] - g_t . y_t)       (d loss / d aq = d / d l)
    dq_t = sum_m dl[t, m] (w_m - q_t);  dvbar[m] = sum_t r[t, m] g_t;  dlks[m] = sum_t dl
    pi[t, m] = exp(ak[t, m] - lks[m])
    dak[t, m] = pi[t, m] (dlks[m] + v_t . dvbar[m] - vbar[m] . dvbar[m])
    dk_t = sum_m dak[t, m] (w_m - k_t);  dv_t = sum_m pi[t, m] dvbar[m]
    dw_m = sum_t dl[t, m] q_t + dak[t, m] k_t
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from vitkernels.triton._common import (
    SHORT,
    Launch,
    TensorFactory,
    alloc,
    cdiv,
    dot_precision,
    launch,
)
from vitkernels.workloads import PerformerShape

__all__ = [
    "TARGET_PROGRAMS",
    "performer_attention_bwd",
    "performer_attention_fwd",
    "record_calls",
]

# Chunking heuristic: split each batch element's tokens into chunks so that about
# this many programs run (a GPU tuning pass may change it; tests lower it to get
# several chunks of several tiles from tiny shapes).
TARGET_PROGRAMS = 1024


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_t_kv: int  # token tile of the key/value-side kernel
    block_t_q: int  # token tile of the query-side kernel
    block_e: int
    block_m: int
    chunk_len: int  # tokens per chunk, a multiple of both token tiles
    n_chunks: int
    num_warps_kv: int  # warps of the key/value-side kernel
    num_warps_q: int  # warps of the query-side kernel
    num_stages: int


def _pow2(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


def launch_config(
    B: int, T: int, E: int, M: int, dtype: torch.dtype, backward: bool = False
) -> LaunchConfig:
    """Block sizes and token chunking for one shape: a small deterministic heuristic.

    Token tiles are chosen so that no specialisation spills registers (the compile-budget test);
    chunks are sized so that about TARGET_PROGRAMS programs run, each over whole tiles.
    """
    block_e = _pow2(E, 16)
    block_m = _pow2(M, 16)
    # float32 inputs use exact float32 ("ieee") dots on CUDA cores: smaller tiles, and
    # no software pipelining (it spills registers: in the backward with triton 3.9, in
    # the forward's key pass with triton 3.6 on sm_90a, 148 B)
    num_stages = 1 if dtype == torch.float32 else 2
    if backward:
        # float32: the query side on 4 warps spilled 8 B (bwd_q, triton 3.9, sm_90a, misaligned
        # inputs), the key side on 8 spilled 4 B (bwd_kv with dw, triton 3.9, sm_80)
        # 16-bit: 64 tokens on 4 warps, one 16-row MMA slab per warp (32 tokens on 8 warps
        # issued each tile's dots twice: the query side was issue-bound)
        bt, warps_kv, warps_q = (16, 4, 8) if dtype == torch.float32 else (64, 4, 4)
    else:
        # float32: 32 tokens on 4 warps spilled 4 B (fwd_q, triton 3.9, sm_80, as launched)
        bt, warps_kv, warps_q = (32, 8, 8) if dtype == torch.float32 else (64, 4, 4)
    bt_kv = bt_q = bt
    cap = _pow2(T, 16)
    bt_kv, bt_q = min(bt_kv, cap), min(bt_q, cap)
    tile = max(bt_kv, bt_q)
    n_tiles = cdiv(T, tile)
    want = max(1, cdiv(TARGET_PROGRAMS, max(B, 1)))
    chunk_len = cdiv(n_tiles, min(n_tiles, want)) * tile
    return LaunchConfig(
        block_t_kv=bt_kv,
        block_t_q=bt_q,
        block_e=block_e,
        block_m=block_m,
        chunk_len=chunk_len,
        n_chunks=triton.cdiv(T, chunk_len),
        num_warps_kv=warps_kv,
        num_warps_q=warps_q,
        num_stages=num_stages,
    )


# ----------------------------------------------------------------------------
# helpers shared by the kernels


@triton.jit
def _split(x, DT: tl.constexpr, SPLIT: tl.constexpr):
    """float32 x -> (hi, lo) in DT with hi + lo ~= x; lo is unused unless SPLIT."""
    hi = x.to(DT)
    if SPLIT:
        lo = (x - hi.to(tl.float32)).to(DT)
    else:
        lo = hi
    return hi, lo


@triton.jit
def _dot2(a, b_hi, b_lo, acc, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ (b_hi + b_lo) (b_lo only when SPLIT)."""
    acc = tl.dot(a, b_hi, acc, input_precision=PREC)
    if SPLIT:
        acc = tl.dot(a, b_lo, acc, input_precision=PREC)
    return acc


@triton.jit
def _pow2_scale(x, F16: tl.constexpr):
    """A power of two s with max|x| / s in [2^7, 2^8), so that x / s rounds to float16
    without overflow (the backward's float32 intermediates are sums over tokens and
    can exceed 65504 under loss scaling); 1.0 unless F16. Exact: built from bits."""
    if F16:
        big = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        bits = big.to(tl.int32, bitcast=True)
        expo = ((bits >> 23) & 0xFF) - 127 - 7  # floor(log2(big)) - 7
        expo = tl.minimum(tl.maximum(expo, -120), 120)
        return ((expo + 127) << 23).to(tl.float32, bitcast=True)
    else:
        return 1.0


@triton.jit
def _load_wt(w_ptr, stride_wm, stride_we, offs_m, offs_e, mmask, emask, DT: tl.constexpr,
             W_SPLIT: tl.constexpr):
    """w^T as (BLOCK_E, BLOCK_M) hi/lo parts in DT; padded entries are 0."""
    ptrs = w_ptr + offs_e[:, None] * stride_we + offs_m[None, :] * stride_wm
    wt = tl.load(ptrs, mask=emask[:, None] & mmask[None, :], other=0.0).to(tl.float32)
    return _split(wt, DT, W_SPLIT)


@triton.jit
def _logits(x, wt_hi, wt_lo, W_SPLIT: tl.constexpr, PREC: tl.constexpr):
    """x (BLOCK_T, BLOCK_E) in DT -> a = x . w_m - |x|^2 / 2, (BLOCK_T, BLOCK_M) float32."""
    acc = tl.zeros((x.shape[0], wt_hi.shape[1]), dtype=tl.float32)
    acc = _dot2(x, wt_hi, wt_lo, acc, W_SPLIT, PREC)
    xf = x.to(tl.float32)
    return acc - 0.5 * tl.sum(xf * xf, axis=1)[:, None]


@triton.jit
def _merge_stats(pm_ptr, ps_ptr, pu_ptr, b, n_chunks, M, E, offs_m, offs_e, mmask, emask,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Merge the chunks' (max, exp-sum, exp-weighted v) of batch b in chunk order.

    Returns lks (BLOCK_M,) with -inf on padded features and vbar (BLOCK_M, BLOCK_E)
    with 0 on padded entries.
    """
    cm = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    umask = mmask[:, None] & emask[None, :]
    for j in range(0, n_chunks):
        row = b * n_chunks + j
        mj = tl.load(pm_ptr + row * M + offs_m, mask=mmask, other=0.0)
        sj = tl.load(ps_ptr + row * M + offs_m, mask=mmask, other=0.0)
        uj = tl.load(pu_ptr + (row * M + offs_m[:, None]) * E + offs_e[None, :], mask=umask,
                     other=0.0)
        cnew = tl.maximum(cm, mj)
        keep = tl.exp(cm - cnew)  # 0 on the first chunk (cm = -inf, cnew finite)
        take = tl.exp(mj - cnew)
        s = s * keep + sj * take
        u = u * keep[:, None] + uj * take[:, None]
        cm = cnew
    # s >= 1 on real features: the chunk holding the column maximum adds exp(0) * (>= 1)
    s = tl.where(mmask, s, 1.0)
    lks = tl.where(mmask, cm + tl.log(s), float("-inf"))
    vbar = tl.where(umask, u / s[:, None], 0.0)
    return lks, vbar


# ----------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kv_kernel(
    k_ptr, v_ptr, w_ptr, pm_ptr, ps_ptr, pu_ptr,
    T, E, M, chunk_len, n_chunks,
    stride_kb, stride_kt, stride_ke,
    stride_vb, stride_vt, stride_ve,
    stride_wm, stride_we,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    W_SPLIT: tl.constexpr, PREC: tl.constexpr, TRANS_LOAD: tl.constexpr,
):
    """Per (batch, chunk): column max cm, sum_t exp(ak - cm), sum_t exp(ak - cm) v_t.
    TRANS_LOAD (``_trans_loads``): v^T, the dot's first operand, is loaded transposed
    from memory rather than made by ``tl.trans`` of the row tile."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    c = pid % n_chunks
    DT: tl.constexpr = k_ptr.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = tl.arange(0, BLOCK_M)
    emask = offs_e < E
    mmask = offs_m < M
    wt_hi, wt_lo = _load_wt(w_ptr, stride_wm, stride_we, offs_m, offs_e, mmask, emask, DT, W_SPLIT)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + offs_e[None, :] * stride_ke
    v_base = v_ptr + b.to(tl.int64) * stride_vb + offs_e[None, :] * stride_ve
    vt_base = v_ptr + b.to(tl.int64) * stride_vb + offs_e[:, None] * stride_ve
    t_start = c * chunk_len
    t_end = tl.minimum(t_start + chunk_len, T)

    cm = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ut = tl.zeros((BLOCK_E, BLOCK_M), dtype=tl.float32)  # (e, m): e rows fill a wgmma tile
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + offs_t
        tmask = rows < t_end
        lmask = tmask[:, None] & emask[None, :]
        kx = tl.load(k_base + rows[:, None] * stride_kt, mask=lmask, other=0.0)
        if TRANS_LOAD:  # (e, t)
            vx = tl.load(vt_base + rows[None, :] * stride_vt, mask=emask[:, None] & tmask[None, :], other=0.0)
        else:  # (t, e), transposed at the dot (as before TRANS_LOAD: the same machine code)
            vx = tl.load(v_base + rows[:, None] * stride_vt, mask=lmask, other=0.0)
        a = _logits(kx, wt_hi, wt_lo, W_SPLIT, PREC)  # (t, m)
        a = tl.where(tmask[:, None], a, float("-inf"))
        cnew = tl.maximum(cm, tl.max(a, axis=0))  # finite: row 0 of a tile is a token
        keep = tl.exp(cm - cnew)
        p = tl.exp(a - cnew[None, :]).to(DT)  # (t, m) in [0, 1]
        s = s * keep + tl.sum(p.to(tl.float32), axis=0)
        if TRANS_LOAD:
            ut = tl.dot(vx, p, ut * keep[None, :], input_precision=PREC)
        else:
            ut = tl.dot(tl.trans(vx), p, ut * keep[None, :], input_precision=PREC)
        cm = cnew

    row = b * n_chunks + c
    tl.store(pm_ptr + row * M + offs_m, cm, mask=mmask)
    tl.store(ps_ptr + row * M + offs_m, s, mask=mmask)
    tl.store(pu_ptr + (row * M + offs_m[None, :]) * E + offs_e[:, None], ut,
             mask=emask[:, None] & mmask[None, :])


@triton.jit
def _fwd_q_kernel(
    q_ptr, w_ptr, pm_ptr, ps_ptr, pu_ptr, y_ptr, lks_ptr, vbar_ptr,
    T, E, M, chunk_len, n_chunks, log_eps_m,
    stride_qb, stride_qt, stride_qe,
    stride_wm, stride_we,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    HALF: tl.constexpr, W_SPLIT: tl.constexpr, PREC: tl.constexpr,
):
    """Merge the key statistics of batch b, then y for the chunk's tokens."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    c = pid % n_chunks
    DT: tl.constexpr = q_ptr.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = tl.arange(0, BLOCK_M)
    emask = offs_e < E
    mmask = offs_m < M
    wt_hi, wt_lo = _load_wt(w_ptr, stride_wm, stride_we, offs_m, offs_e, mmask, emask, DT, W_SPLIT)
    lks, vbar = _merge_stats(pm_ptr, ps_ptr, pu_ptr, b, n_chunks, M, E, offs_m, offs_e,
                             mmask, emask, BLOCK_M, BLOCK_E)
    first = (offs_m * 0 + c) == 0  # chunk 0 writes the merged statistics
    tl.store(lks_ptr + b * M + offs_m, lks, mask=mmask & first)
    tl.store(vbar_ptr + (b * M + offs_m[:, None]) * E + offs_e[None, :], vbar,
             mask=(mmask & first)[:, None] & emask[None, :])
    vb_hi, vb_lo = _split(vbar, DT, HALF)  # (m, e)

    q_base = q_ptr + b.to(tl.int64) * stride_qb + offs_e[None, :] * stride_qe
    y_base = y_ptr + b.to(tl.int64) * T * E + offs_e[None, :]
    t_start = c * chunk_len
    t_end = tl.minimum(t_start + chunk_len, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + offs_t
        lmask = (rows < t_end)[:, None] & emask[None, :]
        qx = tl.load(q_base + rows[:, None] * stride_qt, mask=lmask, other=0.0)
        lg = _logits(qx, wt_hi, wt_lo, W_SPLIT, PREC) + lks[None, :]  # (t, m), -inf on padding
        st = tl.max(lg, axis=1)
        p = tl.exp(lg - st[:, None]).to(DT)
        z = tl.sum(p.to(tl.float32), axis=1) + tl.exp(log_eps_m - st)
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        acc = _dot2(p, vb_hi, vb_lo, acc, HALF, PREC)
        yt = acc / z[:, None]
        tl.store(y_base + rows[:, None] * E, yt.to(DT), mask=lmask)


# ----------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_q_kernel(
    dy_ptr, q_ptr, w_ptr, lks_ptr, vbar_ptr, dq_ptr, pdv_ptr, pdl_ptr, pdw_ptr,
    T, E, M, chunk_len, n_chunks, log_eps_m,
    stride_gb, stride_gt, stride_ge,
    stride_qb, stride_qt, stride_qe,
    stride_wm, stride_we,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    HALF: tl.constexpr, F16: tl.constexpr, W_SPLIT: tl.constexpr, W_GRAD: tl.constexpr,
    PREC: tl.constexpr, TRANS_LOAD: tl.constexpr,
):
    """dq for the chunk's tokens; partial sums of dvbar, dlks (and dw) for the chunk.
    TRANS_LOAD: dy^T and q^T, first operands of dots, loaded transposed from memory."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    c = pid % n_chunks
    DT: tl.constexpr = q_ptr.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = tl.arange(0, BLOCK_M)
    emask = offs_e < E
    mmask = offs_m < M
    umask = mmask[:, None] & emask[None, :]
    wt_hi, wt_lo = _load_wt(w_ptr, stride_wm, stride_we, offs_m, offs_e, mmask, emask, DT, W_SPLIT)
    w_mat = tl.trans(wt_hi)  # (m, e)
    lks = tl.load(lks_ptr + b * M + offs_m, mask=mmask, other=float("-inf"))
    vbar = tl.load(vbar_ptr + (b * M + offs_m[:, None]) * E + offs_e[None, :], mask=umask,
                   other=0.0)
    vbt_hi, vbt_lo = _split(tl.trans(vbar), DT, HALF)  # (e, m)

    q_base = q_ptr + b.to(tl.int64) * stride_qb + offs_e[None, :] * stride_qe
    g_base = dy_ptr + b.to(tl.int64) * stride_gb + offs_e[None, :] * stride_ge
    qt_base = q_ptr + b.to(tl.int64) * stride_qb + offs_e[:, None] * stride_qe
    gt_base = dy_ptr + b.to(tl.int64) * stride_gb + offs_e[:, None] * stride_ge
    dq_base = dq_ptr + b.to(tl.int64) * T * E + offs_e[None, :]
    # (e, m) accumulators: e rows fill a wgmma tile where m (often 32) would not
    acc_dv = tl.zeros((BLOCK_E, BLOCK_M), dtype=tl.float32)
    acc_dl = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_dw = tl.zeros((BLOCK_E, BLOCK_M), dtype=tl.float32)
    t_start = c * chunk_len
    t_end = tl.minimum(t_start + chunk_len, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + offs_t
        tmask = rows < t_end
        lmask = tmask[:, None] & emask[None, :]
        qx = tl.load(q_base + rows[:, None] * stride_qt, mask=lmask, other=0.0)
        g = tl.load(g_base + rows[:, None] * stride_gt, mask=lmask, other=0.0)
        lg = _logits(qx, wt_hi, wt_lo, W_SPLIT, PREC) + lks[None, :]
        st = tl.max(lg, axis=1)
        p = tl.exp(lg - st[:, None]).to(DT)
        z = tl.sum(p.to(tl.float32), axis=1) + tl.exp(log_eps_m - st)
        r = tl.where(tmask[:, None], p.to(tl.float32) / z[:, None], 0.0)  # (t, m)
        gv = _dot2(g, vbt_hi, vbt_lo, tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32), HALF, PREC)
        gy = tl.sum(r * gv, axis=1)  # g_t . y_t, as y_t = sum_m r[t, m] vbar[m]
        dl = r * (gv - gy[:, None])
        sc = _pow2_scale(dl, F16)
        dl16 = (dl * (1.0 / sc)).to(DT)
        dq = tl.dot(dl16, w_mat, input_precision=PREC) * sc
        dq = dq - tl.sum(dl, axis=1)[:, None] * qx.to(tl.float32)
        tl.store(dq_base + rows[:, None] * E, dq.to(DT), mask=lmask)
        tmask_t = emask[:, None] & tmask[None, :]
        if TRANS_LOAD:
            gt = tl.load(gt_base + rows[None, :] * stride_gt, mask=tmask_t, other=0.0)
        else:
            gt = tl.trans(g)
        acc_dv = tl.dot(gt, r.to(DT), acc_dv, input_precision=PREC)
        acc_dl += tl.sum(dl, axis=0)
        if W_GRAD:
            if TRANS_LOAD:
                qt = tl.load(qt_base + rows[None, :] * stride_qt, mask=tmask_t, other=0.0)
            else:
                qt = tl.trans(qx)
            acc_dw += tl.dot(qt, dl16, input_precision=PREC) * sc

    row = b * n_chunks + c
    tmask_em = emask[:, None] & mmask[None, :]
    tl.store(pdv_ptr + (row * M + offs_m[None, :]) * E + offs_e[:, None], acc_dv, mask=tmask_em)
    tl.store(pdl_ptr + row * M + offs_m, acc_dl, mask=mmask)
    if W_GRAD:
        tl.store(pdw_ptr + (row * M + offs_m[None, :]) * E + offs_e[:, None], acc_dw,
                 mask=tmask_em)


@triton.jit
def _bwd_kv_kernel(
    k_ptr, v_ptr, w_ptr, lks_ptr, vbar_ptr, pdv_ptr, pdl_ptr, dk_ptr, dv_ptr, pdw_ptr,
    T, E, M, chunk_len, n_chunks,
    stride_kb, stride_kt, stride_ke,
    stride_vb, stride_vt, stride_ve,
    stride_wm, stride_we,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    F16: tl.constexpr, W_SPLIT: tl.constexpr, W_GRAD: tl.constexpr, PREC: tl.constexpr,
    TRANS_LOAD: tl.constexpr,
):
    """Merge dvbar, dlks of batch b in chunk order; dk, dv and the key side's dw partial.
    TRANS_LOAD: k^T, the dw dot's first operand, loaded transposed from memory."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    c = pid % n_chunks
    DT: tl.constexpr = k_ptr.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = tl.arange(0, BLOCK_M)
    emask = offs_e < E
    mmask = offs_m < M
    umask = mmask[:, None] & emask[None, :]
    wt_hi, wt_lo = _load_wt(w_ptr, stride_wm, stride_we, offs_m, offs_e, mmask, emask, DT, W_SPLIT)
    w_mat = tl.trans(wt_hi)  # (m, e)
    dvbar = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    dlks = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(0, n_chunks):
        row = b * n_chunks + j
        dvbar += tl.load(pdv_ptr + (row * M + offs_m[:, None]) * E + offs_e[None, :], mask=umask,
                         other=0.0)
        dlks += tl.load(pdl_ptr + row * M + offs_m, mask=mmask, other=0.0)
    lks = tl.load(lks_ptr + b * M + offs_m, mask=mmask, other=0.0)
    vbar = tl.load(vbar_ptr + (b * M + offs_m[:, None]) * E + offs_e[None, :], mask=umask,
                   other=0.0)
    sv = _pow2_scale(dvbar, F16)
    dvb = (dvbar * (1.0 / sv)).to(DT)  # (m, e), scaled by 1 / sv
    dvbt = tl.trans(dvb)  # (e, m)
    # vbar . dvbar with the dvbar the dots use: coef + v_t . dvbar then cancels
    # exactly where v_t = vbar (e.g. T = 1)
    coef = dlks - tl.sum(vbar * dvb.to(tl.float32), axis=1) * sv  # (m,)

    k_base = k_ptr + b.to(tl.int64) * stride_kb + offs_e[None, :] * stride_ke
    v_base = v_ptr + b.to(tl.int64) * stride_vb + offs_e[None, :] * stride_ve
    kt_base = k_ptr + b.to(tl.int64) * stride_kb + offs_e[:, None] * stride_ke
    dk_base = dk_ptr + b.to(tl.int64) * T * E + offs_e[None, :]
    dv_base = dv_ptr + b.to(tl.int64) * T * E + offs_e[None, :]
    acc_dw = tl.zeros((BLOCK_E, BLOCK_M), dtype=tl.float32)  # (e, m), as in _bwd_q_kernel
    t_start = c * chunk_len
    t_end = tl.minimum(t_start + chunk_len, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + offs_t
        tmask = rows < t_end
        lmask = tmask[:, None] & emask[None, :]
        kx = tl.load(k_base + rows[:, None] * stride_kt, mask=lmask, other=0.0)
        vx = tl.load(v_base + rows[:, None] * stride_vt, mask=lmask, other=0.0)
        a = _logits(kx, wt_hi, wt_lo, W_SPLIT, PREC) - lks[None, :]
        pi = tl.exp(tl.where(tmask[:, None] & mmask[None, :], a, float("-inf")))  # (t, m)
        gvk = tl.dot(vx, dvbt, input_precision=PREC) * sv  # (t, m)
        da = pi * (coef[None, :] + gvk)
        sc = _pow2_scale(da, F16)
        da16 = (da * (1.0 / sc)).to(DT)
        dk = tl.dot(da16, w_mat, input_precision=PREC) * sc
        dk = dk - tl.sum(da, axis=1)[:, None] * kx.to(tl.float32)
        dv = tl.dot(pi.to(DT), dvb, input_precision=PREC) * sv
        tl.store(dk_base + rows[:, None] * E, dk.to(DT), mask=lmask)
        tl.store(dv_base + rows[:, None] * E, dv.to(DT), mask=lmask)
        if W_GRAD:
            if TRANS_LOAD:
                kt = tl.load(kt_base + rows[None, :] * stride_kt, mask=emask[:, None] & tmask[None, :], other=0.0)
            else:
                kt = tl.trans(kx)
            acc_dw += tl.dot(kt, da16, input_precision=PREC) * sc
    if W_GRAD:
        row = b * n_chunks + c
        tl.store(pdw_ptr + (row * M + offs_m[None, :]) * E + offs_e[:, None], acc_dw,
                 mask=emask[:, None] & mmask[None, :])


# ----------------------------------------------------------------------------
# launchers

_alloc = alloc  # every buffer the launchers write, outputs and partials (tests poison them)


def _flags(x_dtype: torch.dtype, w_dtype: torch.dtype) -> dict[str, object]:
    half = x_dtype in (torch.float16, torch.bfloat16)
    return {
        "HALF": half,
        "F16": x_dtype == torch.float16,
        "W_SPLIT": half and w_dtype != x_dtype,
        "PREC": dot_precision(x_dtype),
    }


def _log_eps_m(eps: float, M: int) -> float:
    return math.log(eps) + math.log(M) if eps > 0 else float("-inf")


_TRANS_LOADS = True  # bench/ima_probe.py turns it off to run the tl.trans form the GPU got wrong


def _trans_loads(cfg: LaunchConfig, dtype: torch.dtype, E: int, *tensors: torch.Tensor) -> bool:
    """Whether the kernels load the tiles their dots take transposed (first operands:
    v^T, dy^T, q^T, k^T) straight from memory (TRANS_LOAD) rather than as ``tl.trans``
    of the row tile. Where 16-bit row tiles cannot be copied to shared memory
    asynchronously (E not a multiple of 16, or rows Triton cannot prove 16-byte
    aligned: a data pointer not 16-byte aligned, a row stride not a multiple of 16
    elements) and the dot is 64 rows of E wide (a wgmma), Triton stores the loaded
    tile to shared memory and takes its transposed view as wgmma's A operand, and on
    an H200 (triton 3.6) that forward was wrong (bench/NOTES.md, 2026-12-04; the
    compile budget's `transposed_register_a` check finds the pattern). Elsewhere the
    kernels compile exactly as they did when the GPU found them right."""
    if not _TRANS_LOADS or dtype not in (torch.float16, torch.bfloat16) or cfg.block_e < 64:
        return False
    if E % 16:
        return True
    for t in tensors:
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any(s % 16 for s in t.stride()[:-1]):
            return True
    return False


def _tiles_per_chunk(T: int, cfg: LaunchConfig, block_t: int) -> float:
    """Token tiles per program of a (batch, chunk) grid, averaged over the chunks."""
    tiles = sum(cdiv(min(cfg.chunk_len, T - c * cfg.chunk_len), block_t) for c in range(cfg.n_chunks))
    return tiles / cfg.n_chunks


def _tag(q: torch.Tensor, w: torch.Tensor) -> str:
    B, T, E = q.shape
    return f"{SHORT[q.dtype]},w{SHORT[w.dtype]},T{T},E{E},M{w.shape[0]}"


def performer_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, lks, vbar (see the module docstring for the contract)."""
    B, T, E = q.shape
    M = w.shape[0]
    dev = q.device
    cfg = launch_config(B, T, E, M, q.dtype)
    y = _alloc((B, T, E), q.dtype, dev)
    lks = _alloc((B, M), torch.float32, dev)
    vbar = _alloc((B, M, E), torch.float32, dev)
    if B == 0:
        return y, lks, vbar
    nc = cfg.n_chunks
    pm = _alloc((B, nc, M), torch.float32, dev)
    ps = _alloc((B, nc, M), torch.float32, dev)
    pu = _alloc((B, nc, M, E), torch.float32, dev)
    fl = _flags(q.dtype, w.dtype)
    blocks = dict(BLOCK_E=cfg.block_e, BLOCK_M=cfg.block_m)
    grid = (B * nc,)
    tag = _tag(q, w)
    launch(Launch(
        f"performer_fwd_kv[{tag}]", _fwd_kv_kernel, grid,
        [k, v, w, pm, ps, pu, T, E, M, cfg.chunk_len, nc, *k.stride(), *v.stride(), *w.stride()],
        dict(BLOCK_T=cfg.block_t_kv, W_SPLIT=fl["W_SPLIT"], PREC=fl["PREC"],
             TRANS_LOAD=_trans_loads(cfg, q.dtype, E, k, v), **blocks),
        cfg.num_warps_kv, cfg.num_stages,
        reads=(k, v, w), writes=(pm, ps, pu),
        loops={"t0": _tiles_per_chunk(T, cfg, cfg.block_t_kv)},
    ))  # fmt: skip
    launch(Launch(
        f"performer_fwd_q[{tag}]", _fwd_q_kernel, grid,
        [q, w, pm, ps, pu, y, lks, vbar, T, E, M, cfg.chunk_len, nc, _log_eps_m(eps, M),
         *q.stride(), *w.stride()],
        dict(BLOCK_T=cfg.block_t_q, HALF=fl["HALF"], W_SPLIT=fl["W_SPLIT"], PREC=fl["PREC"], **blocks),
        cfg.num_warps_q, cfg.num_stages,
        reads=(q, w, pm, ps, pu), writes=(y, lks, vbar),
        loops={"j": nc, "t0": _tiles_per_chunk(T, cfg, cfg.block_t_q)},
    ))  # fmt: skip
    return y, lks, vbar


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, dw (see the module docstring for the contract)."""
    B, T, E = q.shape
    M = w.shape[0]
    dev = q.device
    cfg = launch_config(B, T, E, M, q.dtype, backward=True)
    dq = _alloc((B, T, E), q.dtype, dev)
    dk = _alloc((B, T, E), q.dtype, dev)
    dv = _alloc((B, T, E), q.dtype, dev)
    if B == 0:
        return dq, dk, dv, torch.zeros(w.shape, dtype=w.dtype, device=dev)
    nc = cfg.n_chunks
    lks = lks.contiguous()
    vbar = vbar.contiguous()
    pdv = _alloc((B, nc, M, E), torch.float32, dev)
    pdl = _alloc((B, nc, M), torch.float32, dev)
    # without w_grad the dw partials are never written nor read: a 1-element stand-in
    dw_shape = (B, nc, M, E) if w_grad else (1,)
    pdwq = _alloc(dw_shape, torch.float32, dev)
    pdwk = _alloc(dw_shape, torch.float32, dev)
    fl = _flags(q.dtype, w.dtype)
    blocks = dict(BLOCK_E=cfg.block_e, BLOCK_M=cfg.block_m)
    grid = (B * nc,)
    tag = _tag(q, w) + (",dw" if w_grad else "")
    trans_q = _trans_loads(cfg, q.dtype, E, dy, q)
    # the transposed loads with 64-token tiles spilled 8-20 B (unaligned T1 rows,
    # sm_90a, triton 3.6 and 3.9; 8 warps too): 32-token tiles there
    bt_q = min(cfg.block_t_q, 32) if trans_q else cfg.block_t_q
    launch(Launch(
        f"performer_bwd_q[{tag}]", _bwd_q_kernel, grid,
        [dy, q, w, lks, vbar, dq, pdv, pdl, pdwq, T, E, M, cfg.chunk_len, nc, _log_eps_m(eps, M),
         *dy.stride(), *q.stride(), *w.stride()],
        dict(BLOCK_T=bt_q, W_GRAD=bool(w_grad), TRANS_LOAD=trans_q, **fl, **blocks),
        cfg.num_warps_q, cfg.num_stages,
        reads=(dy, q, w, lks, vbar), writes=(dq, pdv, pdl) + ((pdwq,) if w_grad else ()),
        loops={"t0": _tiles_per_chunk(T, cfg, bt_q)},
    ))  # fmt: skip
    launch(Launch(
        f"performer_bwd_kv[{tag}]", _bwd_kv_kernel, grid,
        [k, v, w, lks, vbar, pdv, pdl, dk, dv, pdwk, T, E, M, cfg.chunk_len, nc,
         *k.stride(), *v.stride(), *w.stride()],
        dict(BLOCK_T=cfg.block_t_kv, F16=fl["F16"], W_SPLIT=fl["W_SPLIT"], W_GRAD=bool(w_grad),
             PREC=fl["PREC"], TRANS_LOAD=_trans_loads(cfg, q.dtype, E, k, v), **blocks),
        cfg.num_warps_kv, cfg.num_stages,
        reads=(k, v, w, lks, vbar, pdv, pdl), writes=(dk, dv) + ((pdwk,) if w_grad else ()),
        loops={"j": nc, "t0": _tiles_per_chunk(T, cfg, cfg.block_t_kv)},
    ))  # fmt: skip
    if w_grad:
        # a fixed-order reduction over (batch, chunk) partials: deterministic
        dw = (pdwq.sum(dim=(0, 1)) + pdwk.sum(dim=(0, 1))).to(w.dtype)
    else:
        dw = torch.zeros(w.shape, dtype=w.dtype, device=dev)
    return dq, dk, dv, dw


# ----------------------------------------------------------------------------
# the launches of one workload shape (ahead-of-time compiles, the estimate)


def record_calls(
    shape: PerformerShape,
    batch: int,
    dtype: torch.dtype,
    direction: str,
    tensor: TensorFactory,
    w_dtype: torch.dtype = torch.float32,
    w_grad: bool = False,
) -> None:
    """Call the launcher of one direction ("fwd" or "bwd") as T2T-ViT's Token_performer
    calls the op: q, k, v are views of one (B, T, 3E) kqv projection, w is the
    module's (M, E) parameter (float32 in the model), inputs made by ``tensor``."""
    T, E, M = shape.tokens, shape.dim, shape.features
    kqv = tensor((batch, T, 3 * E), dtype)
    k, q, v = kqv.split(E, dim=-1)
    w = tensor((M, E), w_dtype)
    if direction == "fwd":
        performer_attention_fwd(q, k, v, w, 1e-8)
    else:
        lks, vbar = tensor((batch, M), torch.float32), tensor((batch, M, E), torch.float32)
        performer_attention_bwd(tensor((batch, T, E), dtype), q, k, v, w, lks, vbar, 1e-8, w_grad)
