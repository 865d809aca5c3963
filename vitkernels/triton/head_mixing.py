"""Triton kernels for head_mixing_attention: CaiT's talking heads, DeepViT's re-attention.

Math (per batch entry, query i, key j; heads h, g, f in 0..H-1; the spec is
``vitkernels.backends.reference.head_mixing_attention``)::

    s_h = scale * <q_h,i, k_h,j>
    l_g = sum_h A[g,h] s_h (+ a_g)                pre-mix (A, a); else l = s
    p_g = exp(l_g - lse_g,i),  lse_g,i = log sum_j exp(l_g)
    r_f = sum_g P[f,g] p_g + c_f                  post-mix (P, c); else r = p
    n_f = (r_f - mu) * rho * w_f + beta_f         head norm over f; else n = r
          mu = mean_f r_f, rho = (mean_f (r_f - mu)^2 + eps)^-1/2
    o_f,i = sum_j n_f v_f,j

The pre-mix bias a shifts a whole row of l_g by a constant, which softmax ignores:
the kernels leave it out and its gradient is exactly zero.

Backward, given do_f,i (x^ = (r - mu) rho)::

    dn_f = <do_f,i, v_f,j>                        dv_f,j = sum_i n_f do_f,i
    dw_f = sum dn_f x^_f,  dbeta_f = sum dn_f      (sums over batch, i, j)
    dr_f = rho (dn_f w_f - mean_f(dn w) - x^_f mean_f(dn w x^))
    dP[f,g] = sum dr_f p_g,  dc_f = sum dr_f,  dp_g = sum_f P[f,g] dr_f
    delta_g,i = sum_j p_g dp_g                    (needs a pass over the keys: the
    dl_g = p_g (dp_g - delta_g,i)                  mixing breaks FlashAttention's
    dA[g,h] = sum dl_g s_h,  ds_h = sum_g A[g,h] dl_g     delta = rowsum(dO * O))
    dq_h,i = scale sum_j ds_h k_h,j               dk_h,j = scale sum_i ds_h q_h,i

Kernels (every head of a tile in one program, so no (B, H, Nq, Nk) tensor is ever
in memory; a program's tiles hold all heads side by side along a last axis of HP
slots, HP = H rounded up to a power of two, at least 2):

* ``_fwd_kernel``: a program per (b, query block). Pass 1 over the key blocks keeps
  the running max and sum of each mixed head g (online softmax, float32); pass 2
  recomputes the logits, forms p, r and n tile by tile and multiplies by v. Saves
  lse (B, H, Nq) float32.
* ``_bwd_delta_kernel``: a program per (b, query block): delta, and this program's
  partial sums of dP, dc, dw, dbeta.
* ``_bwd_dq_kernel``: a program per (b, query block): dq and the partial sums of dA.
* ``_bwd_dkdv_kernel``: a program per (b, key block), looping over query blocks
  (transposed tiles): dk, dv.

Each head's products are 2-d ``tl.dot``s; the per-head tiles are stacked with
``tl.join`` (a recursive halving, ``_dots``/``_dots_acc``), which puts the head axis
in each thread's registers: the mixing, the softmax statistics and the head norm
are then elementwise work with no data exchange between threads. Parameter
gradients are written as one row of per-program partial sums each (no atomics) and
summed by the launcher in a fixed order, so they are deterministic.

Launcher contract (``head_mixing_attention_fwd`` / ``_bwd`` below):

``head_mixing_attention_fwd(q, k, v, pre_w, post_w, post_b, norm_w, norm_b, scale,
eps, has_norm)``
    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv): one dtype (float16,
    bfloat16 or float32), any strides. pre_w, post_w: (H, H) mixing matrices in
    nn.Linear's convention (out, in), any strides, or None; post_b (H,) or None;
    norm_w, norm_b (H,) or None (with has_norm: the head norm without that affine
    part). Parameters of float16, bfloat16 or float32; the mixing and the norm run
    in float32. Returns out (B, H, Nq, Dv) contiguous in q.dtype and lse (B, H, Nq)
    contiguous float32 (natural log, per mixed head g).

``head_mixing_attention_bwd(grad_out, q, k, v, pre_w, post_w, post_b, norm_w, norm_b,
lse, scale, eps, has_norm)``
    Returns dq, dk, dv (contiguous, q.dtype) and d_pre_w, d_post_w, d_post_b,
    d_norm_w, d_norm_b in their parameters' dtypes (None where the parameter is).

Configs come from small deterministic heuristics of the shape (``_fwd_cfg``,
``_bwd_cfg``) for a GPU tuning pass to revise; no autotuning.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

__all__ = ["head_mixing_attention_bwd", "head_mixing_attention_fwd"]

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------
# per-head tiles stacked along a last axis of n slots, slot i holding head h0 + step*i
# (zeros for heads >= H); built by halving: the even slots are the heads h0 + 2 step i,
# the odd ones h0 + step + 2 step i. The kernels call them with h0 = 0, step = 1, so
# slot i is head i.


@triton.jit
def _dots(
    X, x_offs, x_mask, sxh, Y, y_offs, y_mask, syh,
    h0: tl.constexpr, step: tl.constexpr, n: tl.constexpr, H: tl.constexpr,
):  # fmt: skip
    """(R, C, n): slot i = X_h @ Y_h, X_h the (R, K) tile at X + h*sxh + x_offs and
    Y_h the (K, C) tile at Y + h*syh + y_offs."""
    if n == 2:
        x = tl.load(X + h0 * sxh + x_offs, mask=x_mask, other=0.0)
        y = tl.load(Y + h0 * syh + y_offs, mask=y_mask, other=0.0)
        a = tl.dot(x, y, input_precision="tf32x3")
        if h0 + step < H:
            x = tl.load(X + (h0 + step) * sxh + x_offs, mask=x_mask, other=0.0)
            y = tl.load(Y + (h0 + step) * syh + y_offs, mask=y_mask, other=0.0)
            b = tl.dot(x, y, input_precision="tf32x3")
        else:
            b = tl.zeros_like(a)
        return tl.join(a, b)
    else:
        a = _dots(X, x_offs, x_mask, sxh, Y, y_offs, y_mask, syh, h0, 2 * step, n // 2, H)
        b = _dots(X, x_offs, x_mask, sxh, Y, y_offs, y_mask, syh, h0 + step, 2 * step, n // 2, H)
        return tl.reshape(tl.join(a, b), (a.shape[0], a.shape[1], n))


@triton.jit
def _dots_acc(
    x3, Y, y_offs, y_mask, syh, acc3,
    h0: tl.constexpr, step: tl.constexpr, n: tl.constexpr, H: tl.constexpr,
):  # fmt: skip
    """acc3 (R, C, n) with slot i += x3's slot i (R, K) @ Y_h, the (K, C) tile at
    Y + h*syh + y_offs (x3 cast to Y's dtype)."""
    if n == 2:
        xa, xb = tl.split(x3)
        aa, ab = tl.split(acc3)
        y = tl.load(Y + h0 * syh + y_offs, mask=y_mask, other=0.0)
        aa = tl.dot(xa.to(y.dtype), y, aa, input_precision="tf32x3")
        if h0 + step < H:
            y = tl.load(Y + (h0 + step) * syh + y_offs, mask=y_mask, other=0.0)
            ab = tl.dot(xb.to(y.dtype), y, ab, input_precision="tf32x3")
        return tl.join(aa, ab)
    else:
        xe, xo = tl.split(tl.reshape(x3, (x3.shape[0], x3.shape[1], n // 2, 2)))
        ae, ao = tl.split(tl.reshape(acc3, (acc3.shape[0], acc3.shape[1], n // 2, 2)))
        ae = _dots_acc(xe, Y, y_offs, y_mask, syh, ae, h0, 2 * step, n // 2, H)
        ao = _dots_acc(xo, Y, y_offs, y_mask, syh, ao, h0 + step, 2 * step, n // 2, H)
        return tl.reshape(tl.join(ae, ao), (acc3.shape[0], acc3.shape[1], n))


@triton.jit
def _mix(x3, W, s_out, s_in, hs, o0: tl.constexpr, step: tl.constexpr, n: tl.constexpr,
         H: tl.constexpr):  # fmt: skip
    """(R, C, n): slot i = sum_j W[o, j] x3[..., j] for o = o0 + step*i (zeros for o >= H);
    W[o, j] at W + o*s_out + j*s_in, read in float32. Each output slot is a reduction
    over the slots of its own thread's registers."""
    if n == 2:
        row = tl.load(W + o0 * s_out + hs * s_in, mask=hs < H, other=0.0).to(tl.float32)
        a = tl.sum(x3 * row[None, None, :], 2)
        if o0 + step < H:
            row = tl.load(W + (o0 + step) * s_out + hs * s_in, mask=hs < H, other=0.0)
            b = tl.sum(x3 * row.to(tl.float32)[None, None, :], 2)
        else:
            b = tl.zeros_like(a)
        return tl.join(a, b)
    else:
        a = _mix(x3, W, s_out, s_in, hs, o0, 2 * step, n // 2, H)
        b = _mix(x3, W, s_out, s_in, hs, o0 + step, 2 * step, n // 2, H)
        return tl.reshape(tl.join(a, b), (x3.shape[0], x3.shape[1], n))


@triton.jit
def _outer_rows(a3, b3, n: tl.constexpr):
    """(R, HP, n): [r, j, i] = sum over the tile's columns c of a3[r, c, i] * b3[r, c, j]."""
    if n == 2:
        ae, ao = tl.split(a3)
        return tl.join(tl.sum(ae[:, :, None] * b3, 1), tl.sum(ao[:, :, None] * b3, 1))
    else:
        ae, ao = tl.split(tl.reshape(a3, (a3.shape[0], a3.shape[1], n // 2, 2)))
        e = _outer_rows(ae, b3, n // 2)
        o = _outer_rows(ao, b3, n // 2)
        return tl.reshape(tl.join(e, o), (a3.shape[0], b3.shape[2], n))


@triton.jit
def _load_vector(Vp, s0, hs, H: tl.constexpr, PRESENT: tl.constexpr, fill):
    """(1, 1, HP) float32 vector; `fill` where absent, 0 in padding slots."""
    if PRESENT:
        x = tl.load(Vp + hs * s0, mask=hs < H, other=0.0).to(tl.float32)
    else:
        x = tl.where(hs < H, fill, 0.0)
    return x[None, None, :]


@triton.jit
def _probs(l3, lse3, ok3, POST_W, s_out, s_in, post_b, hs, H: tl.constexpr,
           HAS_POST: tl.constexpr):  # fmt: skip
    """p = exp2(l - lse) (log2 units; 0 where ok3 is false) and r, p post-mixed."""
    p = tl.where(ok3, tl.exp2(l3 - lse3), 0.0)
    r = p
    if HAS_POST:
        r = _mix(p, POST_W, s_out, s_in, hs, 0, 1, p.shape[2], H) + post_b
    return p, r


@triton.jit
def _head_norm_bwd(dn3, xhat, rho, norm_w, valid, inv_h):
    """dr from dn through n = x^ w + beta, x^ = (r - mean) rho (means over real heads)."""
    g = dn3 * norm_w
    mg = tl.sum(g, 2) * inv_h
    mgx = tl.sum(g * xhat, 2) * inv_h
    return rho[:, :, None] * (g - mg[:, :, None] - xhat * mgx[:, :, None]) * valid


@triton.jit
def _head_norm(r3, norm_w, norm_b, valid, inv_h, eps):
    """LayerNorm over the head slots (valid: 1 for real heads): n, x^ and rho (R, C)."""
    mean = tl.sum(r3 * valid, 2) * inv_h
    xc = (r3 - mean[:, :, None]) * valid
    rho = tl.rsqrt(tl.sum(xc * xc, 2) * inv_h + eps)
    xhat = xc * rho[:, :, None]
    return xhat * norm_w + norm_b, xhat, rho


# ----------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kernel(
    Q, K, V, PRE_W, POST_W, POST_B, NORM_W, NORM_B, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pre0, stride_pre1, stride_post0, stride_post1, stride_postb, stride_nw, stride_nb,
    NQ, NK, NUM_QB, qk_scale, eps,  # qk_scale: scale * log2(e)
    H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_m = pid % NUM_QB
    b = (pid // NUM_QB).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < NQ
    hs = tl.arange(0, HP)  # the head of each slot
    valid = (hs < H).to(tl.float32)[None, None, :]
    inv_h = 1.0 / H

    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    q_offs = offs_m[:, None] * stride_qn + offs_dk[None, :] * stride_qd  # (BM, BDK)
    q_mask = m_ok[:, None] & (offs_dk[None, :] < DK)

    post_b = _load_vector(POST_B, stride_postb, hs, H, HAS_POST_B, 0.0)
    norm_w = _load_vector(NORM_W, stride_nw, hs, H, HAS_NORM_W, 1.0)
    norm_b = _load_vector(NORM_B, stride_nb, hs, H, HAS_NORM_B, 0.0)

    # pass 1: row max and sum of every mixed head (log2 units)
    m_i = tl.full([BLOCK_M, HP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M, HP], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        kt_offs = offs_n[None, :] * stride_kn + offs_dk[:, None] * stride_kd  # (BDK, BN)
        kt_mask = n_ok[None, :] & (offs_dk[:, None] < DK)
        s3 = _dots(Qb, q_offs, q_mask, stride_qh, Kb, kt_offs, kt_mask, stride_kh, 0, 1, HP, H)
        s3 = s3 * qk_scale
        if HAS_PRE:
            s3 = _mix(s3, PRE_W, stride_pre0, stride_pre1, hs, 0, 1, HP, H)
        s3 = tl.where(n_ok[None, :, None], s3, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s3, 1))
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(tl.exp2(s3 - m_new[:, None, :]), 1)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)  # (BM, HP)

    # pass 2: normalised, mixed (and normed) probabilities times v
    acc = tl.zeros([BLOCK_M, BLOCK_DV, HP], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        kt_offs = offs_n[None, :] * stride_kn + offs_dk[:, None] * stride_kd
        kt_mask = n_ok[None, :] & (offs_dk[:, None] < DK)
        s3 = _dots(Qb, q_offs, q_mask, stride_qh, Kb, kt_offs, kt_mask, stride_kh, 0, 1, HP, H)
        s3 = s3 * qk_scale
        if HAS_PRE:
            s3 = _mix(s3, PRE_W, stride_pre0, stride_pre1, hs, 0, 1, HP, H)
        ok3 = n_ok[None, :, None] & (hs < H)[None, None, :]
        _, n3 = _probs(s3, lse2[:, None, :], ok3, POST_W, stride_post0, stride_post1, post_b, hs,
                       H, HAS_POST)
        if HAS_NORM:
            n3, _, _ = _head_norm(n3, norm_w, norm_b, valid, inv_h, eps)
        v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd  # (BN, BDV)
        v_mask = n_ok[:, None] & (offs_dv[None, :] < DV)
        acc = _dots_acc(n3, Vb, v_offs, v_mask, stride_vh, acc, 0, 1, HP, H)

    # out (B, H, NQ, DV) and lse (B, H, NQ) contiguous
    o_ptrs = (
        O + (b * H + hs[None, None, :]) * NQ * DV
        + offs_m[:, None, None] * DV + offs_dv[None, :, None]
    )  # fmt: skip
    o_mask = m_ok[:, None, None] & (offs_dv[None, :, None] < DV) & (hs[None, None, :] < H)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=o_mask)
    tl.store(
        LSE + (b * H + hs[None, :]) * NQ + offs_m[:, None],
        lse2 * 0.6931471805599453,
        mask=m_ok[:, None] & (hs[None, :] < H),
    )


# ----------------------------------------------------------------------------
# backward


@triton.jit
def _tile_bwd(
    s3, lse3, ok3, dn3, PRE_W, stride_pre0, stride_pre1, POST_W, stride_post0, stride_post1,
    post_b, norm_w, norm_b, valid, inv_h, eps, hs,
    H: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    """From a tile's logits s3 (log2 units) and dn3 = <do, v>: p, n, x^ (n without the
    head norm), dr and dp (the gradients of r and of p)."""
    l3 = s3
    if HAS_PRE:
        l3 = _mix(s3, PRE_W, stride_pre0, stride_pre1, hs, 0, 1, s3.shape[2], H)
    p, r = _probs(l3, lse3, ok3, POST_W, stride_post0, stride_post1, post_b, hs, H, HAS_POST)
    n = r
    xhat = r
    dr = dn3
    if HAS_NORM:
        n, xhat, rho = _head_norm(r, norm_w, norm_b, valid, inv_h, eps)
        dr = _head_norm_bwd(dn3, xhat, rho, norm_w, valid, inv_h)
    dp = dr
    if HAS_POST:  # dp_g = sum_f P[f, g] dr_f: the transposed mixing
        dp = _mix(dr, POST_W, stride_post1, stride_post0, hs, 0, 1, dr.shape[2], H)
    return p, n, xhat, dr, dp


@triton.jit
def _bwd_delta_kernel(
    Q, K, V, DO, PRE_W, POST_W, POST_B, NORM_W, NORM_B, LSE, DELTA, PART,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_pre0, stride_pre1, stride_post0, stride_post1, stride_postb, stride_nw, stride_nb,
    NQ, NK, NUM_QB, NPART, qk_scale, eps,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
):  # fmt: skip
    """delta (B, H, NQ) and this program's row of PART: dP (HP x HP, [f, g]), dc, dw, dbeta."""
    pid = tl.program_id(0)
    pid_m = pid % NUM_QB
    b = (pid // NUM_QB).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < NQ
    hs = tl.arange(0, HP)
    valid = (hs < H).to(tl.float32)[None, None, :]
    inv_h = 1.0 / H
    post_b = _load_vector(POST_B, stride_postb, hs, H, HAS_POST_B, 0.0)
    norm_w = _load_vector(NORM_W, stride_nw, hs, H, HAS_NORM_W, 1.0)
    norm_b = _load_vector(NORM_B, stride_nb, hs, H, HAS_NORM_B, 0.0)

    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    Gb = DO + b * stride_gb
    q_offs = offs_m[:, None] * stride_qn + offs_dk[None, :] * stride_qd  # (BM, BDK)
    q_mask = m_ok[:, None] & (offs_dk[None, :] < DK)
    g_offs = offs_m[:, None] * stride_gn + offs_dv[None, :] * stride_gd  # (BM, BDV)
    g_mask = m_ok[:, None] & (offs_dv[None, :] < DV)
    row_ok = m_ok[:, None] & (hs[None, :] < H)
    rows = (b * H + hs[None, :]) * NQ + offs_m[:, None]  # (BM, HP) into (B, H, NQ)
    lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634

    delta = tl.zeros([BLOCK_M, HP], tl.float32)
    acc_dp = tl.zeros([BLOCK_M, HP, HP], tl.float32)  # [i, g, f]
    acc_dc = tl.zeros([BLOCK_M, HP], tl.float32)
    acc_dw = tl.zeros([BLOCK_M, HP], tl.float32)
    acc_db = tl.zeros([BLOCK_M, HP], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        kt_offs = offs_n[None, :] * stride_kn + offs_dk[:, None] * stride_kd  # (BDK, BN)
        kt_mask = n_ok[None, :] & (offs_dk[:, None] < DK)
        vt_offs = offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd  # (BDV, BN)
        vt_mask = n_ok[None, :] & (offs_dv[:, None] < DV)
        s3 = _dots(Qb, q_offs, q_mask, stride_qh, Kb, kt_offs, kt_mask, stride_kh, 0, 1, HP, H)
        dn3 = _dots(Gb, g_offs, g_mask, stride_gh, Vb, vt_offs, vt_mask, stride_vh, 0, 1, HP, H)
        ok3 = n_ok[None, :, None] & row_ok[:, None, :]
        p, _, xhat, dr, dp = _tile_bwd(
            s3 * qk_scale, lse2[:, None, :], ok3, dn3, PRE_W, stride_pre0, stride_pre1,
            POST_W, stride_post0, stride_post1, post_b, norm_w, norm_b, valid, inv_h, eps, hs,
            H, HAS_PRE, HAS_POST, HAS_NORM,
        )  # fmt: skip
        delta += tl.sum(p * dp, 1)
        if HAS_NORM:
            acc_dw += tl.sum(dn3 * xhat, 1)
            acc_db += tl.sum(dn3, 1)
        if HAS_POST:
            acc_dp += _outer_rows(dr, p, HP)
            acc_dc += tl.sum(dr, 1)

    tl.store(DELTA + rows, delta, mask=row_ok)
    part = PART + pid.to(tl.int64) * NPART
    if HAS_POST:
        tl.store(part + hs[None, :] * HP + hs[:, None], tl.sum(acc_dp, 0))  # dP[f, g]
        tl.store(part + HP * HP + hs, tl.sum(acc_dc, 0))
    if HAS_NORM:
        tl.store(part + HP * HP + HP + hs, tl.sum(acc_dw, 0))
        tl.store(part + HP * HP + 2 * HP + hs, tl.sum(acc_db, 0))


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, PRE_W, POST_W, POST_B, NORM_W, NORM_B, LSE, DELTA, DQ_, PART,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_pre0, stride_pre1, stride_post0, stride_post1, stride_postb, stride_nw, stride_nb,
    NQ, NK, NUM_QB, NPART, qk_scale, sm_scale, eps,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
):  # fmt: skip
    """dq (B, H, NQ, DK) and this program's dA (HP x HP, [g, h]) in PART after the
    delta kernel's columns."""
    pid = tl.program_id(0)
    pid_m = pid % NUM_QB
    b = (pid // NUM_QB).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < NQ
    hs = tl.arange(0, HP)
    valid = (hs < H).to(tl.float32)[None, None, :]
    inv_h = 1.0 / H
    post_b = _load_vector(POST_B, stride_postb, hs, H, HAS_POST_B, 0.0)
    norm_w = _load_vector(NORM_W, stride_nw, hs, H, HAS_NORM_W, 1.0)
    norm_b = _load_vector(NORM_B, stride_nb, hs, H, HAS_NORM_B, 0.0)

    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    Gb = DO + b * stride_gb
    q_offs = offs_m[:, None] * stride_qn + offs_dk[None, :] * stride_qd  # (BM, BDK)
    q_mask = m_ok[:, None] & (offs_dk[None, :] < DK)
    g_offs = offs_m[:, None] * stride_gn + offs_dv[None, :] * stride_gd  # (BM, BDV)
    g_mask = m_ok[:, None] & (offs_dv[None, :] < DV)
    row_ok = m_ok[:, None] & (hs[None, :] < H)
    rows = (b * H + hs[None, :]) * NQ + offs_m[:, None]  # (BM, HP) into (B, H, NQ)
    lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_DK, HP], tl.float32)
    acc_da = tl.zeros([BLOCK_M, HP, HP], tl.float32)  # [i, h, g]
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        kt_offs = offs_n[None, :] * stride_kn + offs_dk[:, None] * stride_kd  # (BDK, BN)
        kt_mask = n_ok[None, :] & (offs_dk[:, None] < DK)
        vt_offs = offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd  # (BDV, BN)
        vt_mask = n_ok[None, :] & (offs_dv[:, None] < DV)
        s3 = _dots(Qb, q_offs, q_mask, stride_qh, Kb, kt_offs, kt_mask, stride_kh, 0, 1, HP, H)
        s3 = s3 * qk_scale
        dn3 = _dots(Gb, g_offs, g_mask, stride_gh, Vb, vt_offs, vt_mask, stride_vh, 0, 1, HP, H)
        ok3 = n_ok[None, :, None] & row_ok[:, None, :]
        p, _, _, _, dp = _tile_bwd(
            s3, lse2[:, None, :], ok3, dn3, PRE_W, stride_pre0, stride_pre1,
            POST_W, stride_post0, stride_post1, post_b, norm_w, norm_b, valid, inv_h, eps, hs,
            H, HAS_PRE, HAS_POST, HAS_NORM,
        )  # fmt: skip
        ds = p * (dp - delta[:, None, :])  # d l
        if HAS_PRE:
            acc_da += _outer_rows(ds, s3, HP)
            ds = _mix(ds, PRE_W, stride_pre1, stride_pre0, hs, 0, 1, HP, H)  # sum_g A[g, h] dl_g
        k_offs = offs_n[:, None] * stride_kn + offs_dk[None, :] * stride_kd  # (BN, BDK)
        k_mask = n_ok[:, None] & (offs_dk[None, :] < DK)
        dq = _dots_acc(ds, Kb, k_offs, k_mask, stride_kh, dq, 0, 1, HP, H)

    dq_ptrs = (
        DQ_ + (b * H + hs[None, None, :]) * NQ * DK
        + offs_m[:, None, None] * DK + offs_dk[None, :, None]
    )  # fmt: skip
    dq_mask = m_ok[:, None, None] & (offs_dk[None, :, None] < DK) & (hs[None, None, :] < H)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ_.dtype.element_ty), mask=dq_mask)
    if HAS_PRE:  # s3 was in log2 units
        part = PART + pid.to(tl.int64) * NPART + HP * HP + 3 * HP
        tl.store(part + hs[None, :] * HP + hs[:, None], tl.sum(acc_da, 0) * 0.6931471805599453)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, PRE_W, POST_W, POST_B, NORM_W, NORM_B, LSE, DELTA, DK_, DV_,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_pre0, stride_pre1, stride_post0, stride_post1, stride_postb, stride_nw, stride_nb,
    NQ, NK, NUM_KB, qk_scale, sm_scale, eps,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
):  # fmt: skip
    """dk (B, H, NK, DK) and dv (B, H, NK, DV): a program per key block, transposed
    tiles (keys x queries) over the query blocks."""
    pid = tl.program_id(0)
    pid_n = pid % NUM_KB
    b = (pid // NUM_KB).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < NK
    hs = tl.arange(0, HP)
    valid = (hs < H).to(tl.float32)[None, None, :]
    inv_h = 1.0 / H
    post_b = _load_vector(POST_B, stride_postb, hs, H, HAS_POST_B, 0.0)
    norm_w = _load_vector(NORM_W, stride_nw, hs, H, HAS_NORM_W, 1.0)
    norm_b = _load_vector(NORM_B, stride_nb, hs, H, HAS_NORM_B, 0.0)

    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    Gb = DO + b * stride_gb
    k_offs = offs_n[:, None] * stride_kn + offs_dk[None, :] * stride_kd  # (BN, BDK)
    k_mask = n_ok[:, None] & (offs_dk[None, :] < DK)
    v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd  # (BN, BDV)
    v_mask = n_ok[:, None] & (offs_dv[None, :] < DV)
    col_ok = n_ok[:, None] & (hs[None, :] < H)

    dk = tl.zeros([BLOCK_N, BLOCK_DK, HP], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV, HP], tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < NQ
        qt_offs = offs_m[None, :] * stride_qn + offs_dk[:, None] * stride_qd  # (BDK, BM)
        qt_mask = m_ok[None, :] & (offs_dk[:, None] < DK)
        gt_offs = offs_m[None, :] * stride_gn + offs_dv[:, None] * stride_gd  # (BDV, BM)
        gt_mask = m_ok[None, :] & (offs_dv[:, None] < DV)
        row_ok = m_ok[:, None] & (hs[None, :] < H)
        rows = (b * H + hs[None, :]) * NQ + offs_m[:, None]  # (BM, HP) into (B, H, NQ)
        lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        st3 = _dots(Kb, k_offs, k_mask, stride_kh, Qb, qt_offs, qt_mask, stride_qh, 0, 1, HP, H)
        dnt3 = _dots(Vb, v_offs, v_mask, stride_vh, Gb, gt_offs, gt_mask, stride_gh, 0, 1, HP, H)
        ok3 = col_ok[:, None, :] & row_ok[None, :, :]
        p, n, _, _, dp = _tile_bwd(
            st3 * qk_scale, lse2[None, :, :], ok3, dnt3, PRE_W, stride_pre0, stride_pre1,
            POST_W, stride_post0, stride_post1, post_b, norm_w, norm_b, valid, inv_h, eps, hs,
            H, HAS_PRE, HAS_POST, HAS_NORM,
        )  # fmt: skip
        g_offs = offs_m[:, None] * stride_gn + offs_dv[None, :] * stride_gd  # (BM, BDV)
        g_mask = m_ok[:, None] & (offs_dv[None, :] < DV)
        dv = _dots_acc(n, Gb, g_offs, g_mask, stride_gh, dv, 0, 1, HP, H)
        ds = p * (dp - delta[None, :, :])  # d l
        if HAS_PRE:
            ds = _mix(ds, PRE_W, stride_pre1, stride_pre0, hs, 0, 1, HP, H)
        q_offs = offs_m[:, None] * stride_qn + offs_dk[None, :] * stride_qd  # (BM, BDK)
        q_mask = m_ok[:, None] & (offs_dk[None, :] < DK)
        dk = _dots_acc(ds, Qb, q_offs, q_mask, stride_qh, dk, 0, 1, HP, H)

    base = (b * H + hs[None, None, :]) * NK + offs_n[:, None, None]
    mask = n_ok[:, None, None] & (hs[None, None, :] < H)
    tl.store(
        DK_ + base * DK + offs_dk[None, :, None], (dk * sm_scale).to(DK_.dtype.element_ty),
        mask=mask & (offs_dk[None, :, None] < DK),
    )
    tl.store(
        DV_ + base * DV + offs_dv[None, :, None], dv.to(DV_.dtype.element_ty),
        mask=mask & (offs_dv[None, :, None] < DV),
    )


# ----------------------------------------------------------------------------
# configs: small deterministic heuristics of the shape


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Launch:
    """One kernel launch: the constexprs and launch options the heuristics chose."""

    kernel: object
    constexprs: dict
    num_warps: int
    num_stages: int


def _common(heads: int, dk: int, dv: int, flags: dict) -> dict:
    return dict(
        H=heads, HP=max(2, _pow2(heads)), BLOCK_DK=max(16, _pow2(dk)), BLOCK_DV=max(16, _pow2(dv)),
        DK=dk, DV=dv, **flags,
    )  # fmt: skip


def _fwd_cfg(heads: int, nq: int, nk: int, dk: int, dv: int, flags: dict) -> _Launch:
    c = _common(heads, dk, dv, flags)
    block_m = min(64, max(16, _pow2(nq)))
    block_n = min(32, max(16, _pow2(nk)))
    return _Launch(_fwd_kernel, dict(**c, BLOCK_M=block_m, BLOCK_N=block_n), 4, 1)


def _bwd_cfg(heads: int, nq: int, nk: int, dk: int, dv: int, flags: dict) -> tuple[_Launch, ...]:
    """(delta, dq, dkdv) launches; delta and dq share BLOCK_M (one row of partial
    parameter sums per query block)."""
    c = _common(heads, dk, dv, flags)
    block_m = min(64, max(16, _pow2(nq)))
    block_n = min(32, max(16, _pow2(nk)))
    rows = dict(**c, BLOCK_M=block_m, BLOCK_N=block_n)
    kv_n = min(64, max(16, _pow2(nk)))
    kv_m = min(32, max(16, _pow2(nq)))
    cols = dict(**c, BLOCK_M=kv_m, BLOCK_N=kv_n)
    return (
        _Launch(_bwd_delta_kernel, rows, 4, 1),
        _Launch(_bwd_dq_kernel, rows, 4, 1),
        _Launch(_bwd_dkdv_kernel, cols, 4, 1),
    )


# ----------------------------------------------------------------------------
# launchers


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers hand to a kernel (tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _flags(pre_w, post_w, post_b, norm_w, norm_b, has_norm: bool) -> dict:
    return dict(
        HAS_PRE=pre_w is not None, HAS_POST=post_w is not None, HAS_POST_B=post_b is not None,
        HAS_NORM=has_norm, HAS_NORM_W=has_norm and norm_w is not None,
        HAS_NORM_B=has_norm and norm_b is not None,
    )  # fmt: skip


def _param_args(q: torch.Tensor, pre_w, post_w, post_b, norm_w, norm_b) -> list:
    """Pointers and strides of the parameters (q stands in for an absent one)."""
    def mat(w):
        return (q, 0, 0) if w is None else (w, w.stride(0), w.stride(1))

    def vec(x):
        return (q, 0) if x is None else (x, x.stride(0))

    (pw, *ps), (qw, *qs) = mat(pre_w), mat(post_w)
    (pb, pbs), (nw, nws), (nb, nbs) = vec(post_b), vec(norm_w), vec(norm_b)
    return [pw, qw, pb, nw, nb], [*ps, *qs, pbs, nws, nbs]


def head_mixing_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pre_w: torch.Tensor | None,
    post_w: torch.Tensor | None,
    post_b: torch.Tensor | None,
    norm_w: torch.Tensor | None,
    norm_b: torch.Tensor | None,
    scale: float,
    eps: float,
    has_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out (B, H, Nq, Dv) q.dtype, lse (B, H, Nq) float32). See the module docstring."""
    B, H, NQ, DK = q.shape
    NK, DV = k.shape[2], v.shape[3]
    out = _alloc((B, H, NQ, DV), q.dtype, q.device)
    lse = _alloc((B, H, NQ), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    flags = _flags(pre_w, post_w, post_b, norm_w, norm_b, has_norm)
    cfg = _fwd_cfg(H, NQ, NK, DK, DV, flags)
    num_qb = triton.cdiv(NQ, cfg.constexprs["BLOCK_M"])
    ptrs, strides = _param_args(q, pre_w, post_w, post_b, norm_w, norm_b)
    _fwd_kernel[(num_qb * B,)](
        q, k, v, *ptrs, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *strides,
        NQ, NK, num_qb, scale * _LOG2E, eps,
        **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def head_mixing_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pre_w: torch.Tensor | None,
    post_w: torch.Tensor | None,
    post_b: torch.Tensor | None,
    norm_w: torch.Tensor | None,
    norm_b: torch.Tensor | None,
    lse: torch.Tensor,
    scale: float,
    eps: float,
    has_norm: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Backward: (dq, dk, dv, d_pre_w, d_post_w, d_post_b, d_norm_w, d_norm_b); the
    parameter gradients are None where the parameter is. See the module docstring."""
    B, H, NQ, DK = q.shape
    NK, DV = k.shape[2], v.shape[3]
    dev = q.device
    dq = _alloc((B, H, NQ, DK), q.dtype, dev)
    dk = _alloc((B, H, NK, DK), q.dtype, dev)
    dv = _alloc((B, H, NK, DV), q.dtype, dev)
    params = (pre_w, post_w, post_b, norm_w, norm_b)
    if B == 0:
        zeros = [None if t is None else torch.zeros_like(t) for t in params]
        return dq, dk, dv, *zeros
    flags = _flags(pre_w, post_w, post_b, norm_w, norm_b, has_norm)
    delta_cfg, dq_cfg, dkdv_cfg = _bwd_cfg(H, NQ, NK, DK, DV, flags)
    HP = delta_cfg.constexprs["HP"]
    num_qb = triton.cdiv(NQ, delta_cfg.constexprs["BLOCK_M"])
    ptrs, strides = _param_args(q, *params)
    npart = 2 * HP * HP + 3 * HP
    delta = _alloc((B, H, NQ), torch.float32, dev)
    # a row per query block; the columns of absent parameters are never written or read
    part = _alloc((B * num_qb, npart), torch.float32, dev)
    common = (
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *strides,
    )  # fmt: skip
    qk_scale = scale * _LOG2E
    _bwd_delta_kernel[(num_qb * B,)](
        q, k, v, grad_out, *ptrs, lse, delta, part, *common,
        NQ, NK, num_qb, npart, qk_scale, eps,
        **delta_cfg.constexprs, num_warps=delta_cfg.num_warps, num_stages=delta_cfg.num_stages,
    )  # fmt: skip
    _bwd_dq_kernel[(num_qb * B,)](
        q, k, v, grad_out, *ptrs, lse, delta, dq, part, *common,
        NQ, NK, num_qb, npart, qk_scale, scale, eps,
        **dq_cfg.constexprs, num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages,
    )  # fmt: skip
    num_kb = triton.cdiv(NK, dkdv_cfg.constexprs["BLOCK_N"])
    _bwd_dkdv_kernel[(num_kb * B,)](
        q, k, v, grad_out, *ptrs, lse, delta, dk, dv, *common,
        NQ, NK, num_kb, qk_scale, scale, eps,
        **dkdv_cfg.constexprs, num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages,
    )  # fmt: skip
    # the parameters' gradients: per-program partial sums, added in a fixed order
    rows = B * num_qb
    mats = part[:, : HP * HP].view(rows, HP, HP), part[:, HP * HP + 3 * HP :].view(rows, HP, HP)
    vecs = part[:, HP * HP : HP * HP + 3 * HP].view(rows, 3, HP)

    def grad(t, g):
        return None if t is None else g.sum(dim=0).to(t.dtype)

    return (
        dq, dk, dv,
        grad(pre_w, mats[1][:, :H, :H]), grad(post_w, mats[0][:, :H, :H]),
        grad(post_b, vecs[:, 0, :H]), grad(norm_w if has_norm else None, vecs[:, 1, :H]),
        grad(norm_b if has_norm else None, vecs[:, 2, :H]),
    )  # fmt: skip
