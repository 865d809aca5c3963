"""head_mixing_attention's forward and backward for 5-16 heads, the head mixing on the tensor cores.

The kernels of ``head_mixing.py`` keep every head of a 16-row tile in each thread's
registers: beyond 4 heads they spill. Here the heads are the batch axis of 3-d
``tl.dot``s and the mixing is a dot over the head axis (bench/NOTES.md, 2026-12-01,
helper tcmix): per program (b, BLOCK_M query rows), heads padded to HP = 8 (5-8 heads)
or 16, per key block of BLOCK_N keys:

    s (HP, BM, BN) = q (HP, BM, Dk) @ k^T (HP, Dk, BN)        3-d dot (mma.sync)
    l^T (BM*BN, HP) = s^T (BM*BN, HP) @ A^T (HP, HP)           the pre-mix: one 2-d dot
                                                               (K = 16; wgmma on sm_90a;
                                                               HP = 8: two (query, key)
                                                               pairs a row, blockdiag(A^T, A^T))
    pass 1: running max / sum per element (one exponential), reduced over the key
            lanes once after the loop: the row statistics of every mixed head. Without
            a pre-mix (re-attention) they are each head's own: a launch of their own
            before (``_lse_tc_kernel``, a (b, h, 64 query rows) on 4 warps, wgmma on
            sm_90a) and the fused kernel reads lse and runs pass 2 only (LSE_IN;
            bench/NOTES.md, 2026-12-02, m2stats)
    pass 2: p = 2^(l - lse) (lse = m + log2 sum), r^T = p^T @ P^T (+ c), n = LayerNorm
            over the heads of r (re-attention: row sums of r^T, whose rows hold one
            (query, key)'s heads, two pairs' at HP = 8; helper tcnorm), out (HP, BM, Dv)
            += n @ v

Both passes loop over the whole key blocks without the key mask and take the last
block, with it, after the loop (bench/NOTES.md, 2026-12-01, m2pad).

Math as ``head_mixing.py`` (its module docstring); the pre-mix bias is left out (softmax
ignores it). The mixing's operands are the inputs' 16-bit type (logits and
probabilities rounded to it before each mix, as eager's einsums do under autocast),
accumulated in float32. Saves lse (B, H, Nq) float32 as ``head_mixing.py``'s forward.

Envelope (``vitkernels.ops.head_mixing``): 5-16 heads, float16 / bfloat16 inputs,
Dk and Dv <= 64, any strides and alignment (k and v whose rows are not whole 16-byte
vectors, DeepViT-S's heads of 33, are read from zero-padded copies made by one
launch, ``_pad_kv``, or without a pre-mix by the statistics launch as it reads k),
the head norm optional; the same for the backward
(``head_mixing_attention_bwd_tc``, below: of rows that are not whole 16-byte vectors,
k and v through the forward's copies, which the custom op saves where the head dim
alone makes them needed (``saved_copy_shapes``), else through ``_pad_kv``'s; q and dO
read as they are by the dq launch, which writes the zero-padded copies the dk / dv
launches read). One
config: 16 query rows x 16 keys on 8 warps, the only tile that compiled without spills
at HP = 16 (4 warps and larger tiles spilled 32 B - 45 KB; bench/NOTES.md); in the
backward's dk / dv kernel at HP = 16, dk and dv in two launches, and at heads of 49-64
dk's two column chunks in one each (``_kv_split``), every chunk 32 wide
(``_bwd_chunks``); at one query all of them in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitkernels.triton._common import SHORT, Launch, alloc, cdiv, launch
from vitkernels.triton.head_mixing import _k_split, _param_grad_kernel, _rho, _tag, _width

__all__ = ["MIN_HEADS", "MAX_HEADS", "head_mixing_attention_bwd_tc", "head_mixing_attention_fwd_tc", "saved_copy_shapes"]

MIN_HEADS = 5
MAX_HEADS = 16
BLOCK_M = 16  # query rows (32 at 5-8 heads over more than 16 queries: fewer instructions a row)
BLOCK_N = 16
NUM_WARPS = 8
LSE_BLOCK_M = 64  # _lse_tc_kernel: query rows a program (one warpgroup: wgmma on sm_90a)
LSE_BLOCK_N = 64
LSE_WARPS = 4
LSE_TAIL_N = 16  # its keys past the last whole block, in blocks of this
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

_alloc = alloc  # every buffer the launcher writes (tests poison them)


@triton.jit
def _mix_tc(x3, WT, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """out[g] = sum_h W[g, h] x3[h] for x3 (HP, BM, BN) float32: one (BM*BN*HP/16, 16) @
    (16, 16) dot over the flattened tile. WT (``_mix_weights``) is W^T, or for HP = 8
    blockdiag(W^T, W^T): a row of the flattened tile then holds two (query, key) pairs'
    8 heads (the dot's K stays 16)."""
    yt = tl.dot(_flat(x3, WT.dtype, HP, BM, BN), WT)
    return tl.permute(tl.reshape(yt, (BM, BN, HP)), (2, 0, 1))


@triton.jit
def _mix_weights(W, s_w0, s_w1, H: tl.constexpr, HP: tl.constexpr, dt: tl.constexpr):
    """_mix_tc's (16, 16) right operand: WT[a, b] = W[b % HP, a % HP] on the diagonal
    blocks of HP x HP (zeros elsewhere and for heads >= H)."""
    a = tl.arange(0, 16)
    ra, rb = a[:, None] % HP, a[None, :] % HP
    ok = (a[:, None] // HP == a[None, :] // HP) & (ra < H) & (rb < H)
    return tl.load(W + rb * s_w0 + ra * s_w1, mask=ok, other=0.0).to(dt)


@triton.jit
def _tile3(base, hs, offs, s_h, s_n, s_d, C0: tl.constexpr, C: tl.constexpr, D: tl.constexpr, ok):
    """The (HP, rows, C) tile of columns C0..C0+C of a (H, N, D) operand (zeros outside)."""
    cols = C0 + tl.arange(0, C)
    ptrs = base + hs[:, None, None] * s_h + offs[None, :, None] * s_n + cols[None, None, :] * s_d
    return tl.load(ptrs, mask=ok[:, :, None] & (cols < D)[None, None, :], other=0.0)


@triton.jit
def _logits_tc(qa, qb, Kb, hs, offs_n, kok, s_kh, s_kn, s_kd, W, qk_scale, DK: tl.constexpr,
               KA: tl.constexpr, KB: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               HAS_PRE: tl.constexpr):
    """Mixed logits (HP, BM, BN) in log2 units of one key block."""
    ka = _tile3(Kb, hs, offs_n, s_kh, s_kn, s_kd, 0, KA, DK, kok)
    s = tl.dot(qa, tl.permute(ka, (0, 2, 1)))
    if KB > 0:
        kb = _tile3(Kb, hs, offs_n, s_kh, s_kn, s_kd, KA, KB, DK, kok)
        s = tl.dot(qb, tl.permute(kb, (0, 2, 1)), s)
    s = s * qk_scale
    if HAS_PRE:
        s = _mix_tc(s, W, HP, BM, BN)
    return s


@triton.jit
def _key_block(qa, qb, Kb, hs, h_ok, start, NK, s_kh, s_kn, s_kd, W, qk_scale, DK: tl.constexpr,
               KA: tl.constexpr, KB: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               HAS_PRE: tl.constexpr, NEG_INF: tl.constexpr):  # fmt: skip
    """Key block ``start`` of either pass: the mixed logits (HP, BM, BN) (log2 units), a
    padded key's set to -1e30 (pass 1: a running maximum that stays finite) or, with
    NEG_INF, -inf (pass 2: its p is exactly 0); the keys' offsets, their mask and the
    (HP, BN) mask of the k / v tiles."""
    offs_n = start * BN + tl.arange(0, BN)
    n_ok = offs_n < NK
    kok = h_ok[:, None] & n_ok[None, :]
    lg = _logits_tc(qa, qb, Kb, hs, offs_n, kok, s_kh, s_kn, s_kd, W, qk_scale, DK, KA, KB, HP, BM, BN, HAS_PRE)
    if NEG_INF:
        lg = tl.where(n_ok[None, None, :], lg, -float("inf"))
    else:
        lg = tl.where(n_ok[None, None, :], lg, -1.0e30)
    return lg, offs_n, n_ok, kok


@triton.jit
def _mix_norm_tc(x3, WT, pbc, nwc, nbc, eps, H: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, HAS_NORM: tl.constexpr):  # fmt: skip
    """_mix_tc's post-mix plus its bias, and with HAS_NORM the head norm, on the
    flattened (BM*BN*HP/16, 16) tile before it goes back to (HP, BM, BN): a row holds one
    (query, key)'s 16 head slots (HP = 16) or two pairs' 8 (HP = 8), so the norm's sums
    are row sums (over each half of the row at HP = 8). pbc, nwc, nbc (16,) float32: the
    bias, weight and norm bias of column a's head a % HP (0 for a padded head). A padded
    head's column is exactly 0 (zero weights and bias), so the sum for the mean needs no
    mask; its deviation from the mean does (the variance's)."""
    yt = tl.dot(_flat(x3, WT.dtype, HP, BM, BN), WT) + pbc[None, :]
    if HAS_NORM:
        a = tl.arange(0, 16)
        valid = ((a % HP) < H)[None, :]
        xc = tl.where(valid, yt - _seg_mean(yt, H, HP), 0.0)
        yt = xc * _rho(_seg_mean(xc * xc, H, HP) + eps) * nwc[None, :] + nbc[None, :]
    return tl.permute(tl.reshape(yt, (BM, BN, HP)), (2, 0, 1))


@triton.jit
def _head_norm_tc(r3, nw, nb, h_ok, eps, H: tl.constexpr):
    """LayerNorm over the head axis (axis 0) of r3 (HP, BM, BN) float32: mean and
    variance over the H real heads only (the padded slots masked out of both sums),
    then nw, nb (HP,) float32 (zero in the padded slots)."""
    valid = h_ok[:, None, None]
    x = tl.where(valid, r3, 0.0)
    mean = tl.sum(x, 0) * (1.0 / H)
    xc = tl.where(valid, x - mean[None, :, :], 0.0)
    rho = _rho(tl.sum(xc * xc, 0) * (1.0 / H) + eps)
    return xc * rho[None, :, :] * nw[:, None, None] + nb[:, None, None]


@triton.jit
def _stats_step(lg, me, se):
    """Pass 1's running statistics per element with one key block's logits lg."""
    d = lg - me
    e = tl.exp2(-tl.abs(d))
    se = tl.where(d > 0, se * e + 1.0, se + e)
    return tl.maximum(me, lg), se


@triton.jit
def _pv_step(lg, lse2, offs_n, n_ok, kok, Vb, hs, h_ok, s_vh, s_vn, s_vd, wp, pb, pbc, nw, nb, eps, acc_a, acc_b,
             H: tl.constexpr, HP: tl.constexpr, DV: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, HAS_POST: tl.constexpr, HAS_NORM: tl.constexpr,
             MASK_N: tl.constexpr):  # fmt: skip
    """Pass 2 on one key block: p, the post-mix and the head norm, acc += p.v. With
    MASK_N (the last block) a padded key's logit is -inf (so that p stays finite: its v
    rows are zero, 0 * inf is NaN) and its normed p is zeroed (the norm's bias;
    0 * rsqrt(eps = 0) is NaN); n_ok its key mask. lse2: the rows' log-sum-exp in log2
    units (p = 2^(l - lse2): one FFMA and an exponential an element)."""
    p = tl.exp2(lg - lse2[:, :, None])
    if HAS_POST and HAS_NORM:  # the norm on the post-mix's flattened tile
        p = _mix_norm_tc(p, wp, pbc, nw, nb, eps, H, HP, BM, BN, True)
    elif HAS_POST:
        p = _mix_tc(p, wp, HP, BM, BN) + pb[:, None, None]
    elif HAS_NORM:
        p = _head_norm_tc(p, nw, nb, h_ok, eps, H)
    if HAS_NORM and MASK_N:
        p = tl.where(n_ok[None, None, :], p, 0.0)
    va = _tile3(Vb, hs, offs_n, s_vh, s_vn, s_vd, 0, VA, DV, kok)
    p = p.to(va.dtype)
    acc_a = tl.dot(p, va, acc_a)
    if VB > 0:
        vb = _tile3(Vb, hs, offs_n, s_vh, s_vn, s_vd, VA, VB, DV, kok)
        acc_b = tl.dot(p, vb, acc_b)
    return acc_a, acc_b


@triton.jit
def _pad_kv_kernel(K, V, KP, VP, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, NK, H,
                   DK: tl.constexpr, DV: tl.constexpr, WK: tl.constexpr, WV: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """k (B, H, NK, DK) and v (B, H, NK, DV), any strides, into contiguous copies KP
    (B, H, NK, WK) and VP (B, H, NK, WV), columns DK.. / DV.. zero: BLOCK_R rows of one
    (b, h) a program, read element by element, written as 16-byte vectors (WK, WV
    multiples of 8)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh - b * H
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    r_ok = (rows < NK)[:, None]
    dst = (bh.to(tl.int64) * NK + rows[:, None]) * WK + cols[None, :]
    src = K + b.to(tl.int64) * s_kb + h * s_kh + rows[:, None] * s_kn + cols[None, :] * s_kd
    x = tl.load(src, mask=r_ok & (cols < DK)[None, :], other=0.0)
    tl.store(KP + dst, x, mask=r_ok & (cols < WK)[None, :])
    dst = (bh.to(tl.int64) * NK + rows[:, None]) * WV + cols[None, :]
    src = V + b.to(tl.int64) * s_vb + h * s_vh + rows[:, None] * s_vn + cols[None, :] * s_vd
    x = tl.load(src, mask=r_ok & (cols < DV)[None, :], other=0.0)
    tl.store(VP + dst, x, mask=r_ok & (cols < WV)[None, :])


@triton.jit
def _lse_logits(qa, qb, Kb, KPb, offs_n, n_ok, s_kn, s_kd, copy_lim, DK: tl.constexpr, KA: tl.constexpr,
                KB: tl.constexpr, PAD_KV: tl.constexpr):  # fmt: skip
    """One head's unscaled logits q.k (BM, BN) of the keys offs_n (n_ok their mask; all
    true in a whole block). With PAD_KV the k tile as loaded (zero past DK) is also
    stored into the contiguous copy KPb (rows of KA + KB), its keys below copy_lim (NK
    or 0)."""
    cols = tl.arange(0, KA)
    ka = tl.load(Kb + offs_n[:, None] * s_kn + cols[None, :] * s_kd, mask=n_ok[:, None] & (cols < DK)[None, :],
                 other=0.0)  # fmt: skip
    if PAD_KV:
        tl.store(KPb + offs_n[:, None] * (KA + KB) + cols[None, :], ka, mask=(offs_n < copy_lim)[:, None])
    s = tl.dot(qa, tl.trans(ka))
    if KB > 0:
        cols_b = KA + tl.arange(0, KB)
        kb = tl.load(Kb + offs_n[:, None] * s_kn + cols_b[None, :] * s_kd,
                     mask=n_ok[:, None] & (cols_b < DK)[None, :], other=0.0)  # fmt: skip
        if PAD_KV:
            tl.store(KPb + offs_n[:, None] * (KA + KB) + cols_b[None, :], kb, mask=(offs_n < copy_lim)[:, None])
        s = tl.dot(qb, tl.trans(kb), s)
    return s


@triton.jit
def _lse_step(s, m_i, l_i, c, n_ok, MASK_N: tl.constexpr):
    """Online row maximum (of the unscaled logits s: c >= 0, so the scaled maximum is
    c m) and sum of 2^(c s - c m) with one key block; with MASK_N a padded key (n_ok
    false) is left out of both (its p exactly 0, also at c = 0)."""
    if MASK_N:
        m_new = tl.maximum(m_i, tl.max(tl.where(n_ok[None, :], s, -float("inf")), 1))
        p = tl.exp2(tl.where(n_ok[None, :], s * c - (m_new * c)[:, None], -float("inf")))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s * c - (m_new * c)[:, None])
    l_i = l_i * tl.exp2((m_i - m_new) * c) + tl.sum(p, 1)
    return m_new, l_i


@triton.jit
def _lse_tc_kernel(Q, K, LSE, V, KP, VP, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                   NQ, NK, H, num_qb, qk_scale, DQ: tl.constexpr, DK: tl.constexpr, KA: tl.constexpr,
                   KB: tl.constexpr, DV: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, PAD_KV: tl.constexpr):  # fmt: skip
    """The forward's row statistics without a pre-mix (each head's softmax its own): lse
    (B, H, NQ) float32 (natural log) of one head's BLOCK_M query rows a program, q.k on
    the tensor cores (64 rows on 4 warps: wgmma on sm_90a), online max / sum per row.
    qk_scale: the softmax scale in log2 units, >= 0.

    With PAD_KV it also writes the zero-padded contiguous copies KP (B, H, NK, KA + KB)
    of k and VP (B, H, NK, VA + VB) of v (the fused kernel's operands, ``_pad_kv``'s
    layout): the program of query block i those of the BLOCK_N-key blocks j with
    j % num_qb == i (k's tiles as its loop loads them, v's in a loop of their own), so
    every key block is copied once whatever the number of query blocks."""
    pid = tl.program_id(0)
    bh = pid // num_qb
    qblk = pid - bh * num_qb
    b = bh // H
    h = bh - b * H
    offs_m = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < NQ
    Qb = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + offs_m[:, None] * s_qn
    cols = tl.arange(0, KA)
    qa = tl.load(Qb + cols[None, :] * s_qd, mask=m_ok[:, None] & (cols < DQ)[None, :], other=0.0)
    if KB > 0:
        cols_b = KA + tl.arange(0, KB)
        qb = tl.load(Qb + cols_b[None, :] * s_qd, mask=m_ok[:, None] & (cols_b < DQ)[None, :], other=0.0)
    else:
        qb = qa
    Kb = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    KPb = KP + bh.to(tl.int64) * NK * (KA + KB)
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    # the whole BLOCK_N-key blocks without the key mask, then the rest (NK % BLOCK_N keys)
    # in blocks of TAIL_N with it (a padded key adds exactly 0). The running maximum is
    # of the unscaled logits (qk_scale >= 0: the launcher negates q for a negative scale),
    # so p = 2^(qk_scale s - qk_scale m) is one FFMA and one exponential an element
    n_all = tl.full((BLOCK_N,), 1, tl.int1)
    for start_n in range(0, NK // BLOCK_N):
        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        copy_lim = tl.where(start_n % num_qb == qblk, NK, 0)
        s = _lse_logits(qa, qb, Kb, KPb, offs_n, n_all, s_kn, s_kd, copy_lim, DK, KA, KB, PAD_KV)
        m_i, l_i = _lse_step(s, m_i, l_i, qk_scale, n_all, False)
    copy_lim = tl.where((NK // BLOCK_N) % num_qb == qblk, NK, 0)  # the tail's key block
    for tail_n in range((NK // BLOCK_N) * (BLOCK_N // TAIL_N), tl.cdiv(NK, TAIL_N)):
        offs_n = tail_n * TAIL_N + tl.arange(0, TAIL_N)
        n_ok = offs_n < NK
        s = _lse_logits(qa, qb, Kb, KPb, offs_n, n_ok, s_kn, s_kd, copy_lim, DK, KA, KB, PAD_KV)
        m_i, l_i = _lse_step(s, m_i, l_i, qk_scale, n_ok, True)
    lse = (m_i * qk_scale + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=m_ok)
    if PAD_KV:
        Vb = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
        VPb = VP + bh.to(tl.int64) * NK * (VA + VB)
        for copy_n in range(qblk, tl.cdiv(NK, BLOCK_N), num_qb):
            offs_n = copy_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = (offs_n < NK)[:, None]
            cols_v = tl.arange(0, VA)
            x = tl.load(Vb + offs_n[:, None] * s_vn + cols_v[None, :] * s_vd, mask=n_ok & (cols_v < DV)[None, :],
                        other=0.0)  # fmt: skip
            tl.store(VPb + offs_n[:, None] * (VA + VB) + cols_v[None, :], x, mask=n_ok)
            if VB > 0:
                cols_v = VA + tl.arange(0, VB)
                x = tl.load(Vb + offs_n[:, None] * s_vn + cols_v[None, :] * s_vd,
                            mask=n_ok & (cols_v < DV)[None, :], other=0.0)  # fmt: skip
                tl.store(VPb + offs_n[:, None] * (VA + VB) + cols_v[None, :], x, mask=n_ok)


@triton.jit
def _fwd_tc_kernel(
    Q, K, V, PRE_W, POST_W, POST_B, NORM_W, NORM_B, O, LSE,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_aw0, s_aw1, s_pw0, s_pw1, s_pb, s_nw, s_nb,
    NQ, NK, num_qb, qk_scale, eps,
    H: tl.constexpr, HP: tl.constexpr, DQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DO: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr, LSE_IN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // num_qb
    qblk = pid % num_qb
    hs = tl.arange(0, HP)
    h_ok = hs < H
    offs_m = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < NQ
    qok = h_ok[:, None] & m_ok[None, :]
    Qb = Q + b.to(tl.int64) * s_qb
    Kb = K + b.to(tl.int64) * s_kb
    Vb = V + b.to(tl.int64) * s_vb
    qa = _tile3(Qb, hs, offs_m, s_qh, s_qn, s_qd, 0, KA, DQ, qok)
    if KB > 0:
        qb = _tile3(Qb, hs, offs_m, s_qh, s_qn, s_qd, KA, KB, DQ, qok)
    else:
        qb = qa
    dt = Q.dtype.element_ty
    if HAS_PRE:
        wa = _mix_weights(PRE_W, s_aw0, s_aw1, H, HP, dt)
    else:
        wa = tl.zeros((16, 16), dt)
    if HAS_POST:
        wp = _mix_weights(POST_W, s_pw0, s_pw1, H, HP, dt)
    else:
        wp = tl.zeros((16, 16), dt)
    if HAS_POST_B:
        pb = tl.load(POST_B + hs * s_pb, mask=h_ok, other=0.0).to(tl.float32)
    else:
        pb = tl.zeros((HP,), tl.float32)
    # the head norm's weight and bias, and with the post-mix the post-mix bias, per head
    # slot (HP,) or, with the post-mix (the norm on its flattened tile), per column of
    # that tile (16,): head a % HP
    if HAS_POST:
        hn = tl.arange(0, 16) % HP
    else:
        hn = hs
    if HAS_NORM_W:
        nw = tl.load(NORM_W + hn * s_nw, mask=hn < H, other=0.0).to(tl.float32)
    else:
        nw = tl.where(hn < H, 1.0, 0.0)
    if HAS_NORM_B:
        nb = tl.load(NORM_B + hn * s_nb, mask=hn < H, other=0.0).to(tl.float32)
    else:
        nb = tl.zeros(hn.shape, tl.float32)
    if HAS_POST_B and HAS_POST and HAS_NORM:
        pbc = tl.load(POST_B + hn * s_pb, mask=hn < H, other=0.0).to(tl.float32)
    else:
        pbc = tl.zeros((16,), tl.float32)

    num_kb = tl.cdiv(NK, BLOCK_N)
    # the k / v tiles' mask in a whole key block (every key real): the heads only
    kfull = tl.broadcast_to(h_ok[:, None], (HP, BLOCK_N))
    lse_ptrs = LSE + (b.to(tl.int64) * H + hs[:, None]) * NQ + offs_m[None, :]
    if LSE_IN:
        # no pre-mix: the row statistics are each head's own, from _lse_tc_kernel (a
        # padded head's or row's lse 0: its p finite, kept out of the output by the
        # padded heads' zero mixing weights, the head masks and the masked stores)
        lse2 = tl.load(lse_ptrs, mask=qok, other=0.0) * 1.4426950408889634
    else:
        # pass 1: per-element running max and sum (d = l - m; e = 2^-|d|; one exponential),
        # reduced over the key lanes after the loop. The whole key blocks run without the
        # key mask (the k tile masked by head only); the last block (peeled) sets a padded
        # key's logit to -1e30: its lane's maximum stays -1e30 unless a real key lands
        # there, and adds nothing below
        me = tl.full((HP, BLOCK_M, BLOCK_N), -1.0e30, tl.float32)
        se = tl.zeros((HP, BLOCK_M, BLOCK_N), tl.float32)
        for start_n in range(0, num_kb - 1):
            offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
            lg = _logits_tc(qa, qb, Kb, hs, offs_n, kfull, s_kh, s_kn, s_kd, wa, qk_scale, DK, KA, KB, HP, BLOCK_M,
                            BLOCK_N, HAS_PRE)  # fmt: skip
            me, se = _stats_step(lg, me, se)
        lg, _, _, _ = _key_block(qa, qb, Kb, hs, h_ok, num_kb - 1, NK, s_kh, s_kn, s_kd, wa, qk_scale, DK, KA, KB, HP,
                                 BLOCK_M, BLOCK_N, HAS_PRE, False)  # fmt: skip
        me, se = _stats_step(lg, me, se)
        m_i = tl.max(me, 2)
        l_i = tl.sum(se * tl.exp2(me - m_i[:, :, None]), 2)
        lse2 = m_i + tl.log2(l_i)
        tl.store(lse_ptrs, lse2 * 0.6931471805599453, mask=qok)

    # pass 2: p, the post-mix, p.v; the whole key blocks without the key mask, then the
    # last with it, as a loop of one trip (straight-line code there took ~25 registers
    # more: 247 at M2, and spills at 16 heads of 64, triton 3.9; bench/NOTES.md,
    # 2026-12-01, m2pad)
    acc_a = tl.zeros((HP, BLOCK_M, VA), tl.float32)
    acc_b = tl.zeros((HP, BLOCK_M, VB if VB > 0 else 16), tl.float32)
    for start_t in range(0, num_kb - 1):
        offs_n = start_t * BLOCK_N + tl.arange(0, BLOCK_N)
        lg = _logits_tc(qa, qb, Kb, hs, offs_n, kfull, s_kh, s_kn, s_kd, wa, qk_scale, DK, KA, KB, HP, BLOCK_M,
                        BLOCK_N, HAS_PRE)  # fmt: skip
        # (no key mask: _pv_step's n_ok argument unused)
        acc_a, acc_b = _pv_step(lg, lse2, offs_n, kfull, kfull, Vb, hs, h_ok, s_vh, s_vn, s_vd, wp, pb, pbc, nw,
                                nb, eps, acc_a, acc_b, H, HP, DV, VA, VB, BLOCK_M, BLOCK_N, HAS_POST, HAS_NORM,
                                False)  # fmt: skip
    for end_t in range(num_kb - 1, num_kb):
        lg, offs_n, n_ok, kok = _key_block(qa, qb, Kb, hs, h_ok, end_t, NK, s_kh, s_kn, s_kd, wa, qk_scale, DK,
                                           KA, KB, HP, BLOCK_M, BLOCK_N, HAS_PRE, True)  # fmt: skip
        acc_a, acc_b = _pv_step(lg, lse2, offs_n, n_ok, kok, Vb, hs, h_ok, s_vh, s_vn, s_vd, wp, pb, pbc, nw,
                                nb, eps, acc_a, acc_b, H, HP, DV, VA, VB, BLOCK_M, BLOCK_N, HAS_POST, HAS_NORM,
                                True)  # fmt: skip
    # out (B, H, NQ, DO) contiguous (DO = DV but for v padded by the launcher)
    Ob = O + b.to(tl.int64) * H * NQ * DO
    cols_a = tl.arange(0, VA)
    o_ptrs = Ob + hs[:, None, None] * (NQ * DO) + offs_m[None, :, None] * DO
    tl.store(o_ptrs + cols_a[None, None, :], acc_a.to(dt), mask=qok[:, :, None] & (cols_a < DO)[None, None, :])
    if VB > 0:
        cols_b = VA + tl.arange(0, VB)
        tl.store(o_ptrs + cols_b[None, None, :], acc_b.to(dt), mask=qok[:, :, None] & (cols_b < DO)[None, None, :])


PAD_ROWS = 32  # _pad_kv_kernel's rows a program


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def _pad_kv(k: torch.Tensor, v: torch.Tensor, wk: int, wv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k (B, H, NK, DK), v (B, H, NK, DV) as contiguous copies (B, H, NK, wk) and
    (B, H, NK, wv), the columns past DK / DV zero (wk, wv multiples of 8: rows of whole
    16-byte vectors), made in one launch (any two tensors of the same (B, H, N); the
    backward's q and dO copies are written by its dq launch instead)."""
    B, H, NK, DK = k.shape
    DV = v.shape[3]
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"head_mixing (tensor-core kernels): padding tensors of shapes {_shape(k)} and {_shape(v)}; "
                         "expected the same (B, H, N)")  # fmt: skip
    if wk % 8 or wv % 8 or wk < DK or wv < DV:
        raise ValueError(f"head_mixing (tensor-core kernels): padded widths {wk}, {wv} for k and v of {DK}, "
                         f"{DV} columns; expected multiples of 8 at least as wide")  # fmt: skip
    kp = _alloc((B, H, NK, wk), k.dtype, k.device)
    vp = _alloc((B, H, NK, wv), v.dtype, v.device)
    launch(Launch(
        f"head_mixing_pad_kv[{SHORT[k.dtype]},H{H},Nk{NK},Dk{DK},Dv{DV}]", _pad_kv_kernel,
        (B * H, cdiv(NK, PAD_ROWS)), [k, v, kp, vp, *k.stride(), *v.stride(), NK, H],
        dict(DK=DK, DV=DV, WK=wk, WV=wv, BLOCK_R=PAD_ROWS, BLOCK_C=triton.next_power_of_2(max(wk, wv))), 4, 1,
        reads=(k, v), writes=(kp, vp),
    ))  # fmt: skip
    return kp, vp


def _row_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    v: torch.Tensor | None = None,
    widths: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lse (B, H, Nq) float32 <- log-sum-exp over the keys of scale * q.k^T, each head's
    own (the forward's row statistics without a pre-mix), one ``_lse_tc_kernel`` launch.
    q (B, H, Nq, Dq), k (B, H, Nk, Dk) 16-bit, any strides, Dq <= Dk <= 64 (k's columns
    past Dq, e.g. ``_pad_kv``'s zero padding, are read and meet q's zero columns: they
    must be finite). Returns (k, v) as given; with ``widths`` = (wk, wv) the same launch
    also copies k and v (B, H, Nk, Dv) into zero-padded contiguous (B, H, Nk, wk) and
    (B, H, Nk, wv) (``_pad_kv``'s copies; wk, wv the chunk widths of Dk, Dv) and returns
    those instead."""
    B, H, NQ, DQ = q.shape
    NK, DK = k.shape[2], k.shape[3]
    if k.shape[:2] != q.shape[:2] or not DQ <= DK <= 64 or lse.shape != (B, H, NQ):
        raise ValueError(f"head_mixing (tensor-core row statistics): q {_shape(q)}, k {_shape(k)}, lse "
                         f"{_shape(lse)}; expected q (B, H, Nq, Dq), k (B, H, Nk, Dq <= Dk <= 64), lse (B, H, Nq)")  # fmt: skip
    ka, kb = _k_split(DK)
    pad = widths is not None
    if pad:
        DV = v.shape[3]
        va, vb = _k_split(DV)
        if v.shape[:3] != k.shape[:3] or tuple(widths) != (ka + kb, va + vb):
            raise ValueError(f"head_mixing (tensor-core row statistics): copies of k {_shape(k)} and v {_shape(v)} "
                             f"{tuple(widths)} wide; expected the same (B, H, Nk) and widths {(ka + kb, va + vb)}")  # fmt: skip
        kp = _alloc((B, H, NK, ka + kb), k.dtype, k.device)
        vp = _alloc((B, H, NK, va + vb), v.dtype, v.device)
        vargs = [v, kp, vp, *v.stride()]
    else:
        DV, va, vb = 0, 16, 0
        kp, vp = k, v
        vargs = [k, k, k, 0, 0, 0, 0]  # unused (PAD_KV false)
    # the kernel's running maximum is of the unscaled logits: a negative scale goes in as
    # -q and |scale| (exactly the same logits)
    qs = q if scale >= 0 else -q
    num_qb = cdiv(NQ, LSE_BLOCK_M)
    num_nb = cdiv(NK, LSE_BLOCK_N)
    loops = {"start_n": NK // LSE_BLOCK_N, "tail_n": cdiv(NK % LSE_BLOCK_N, LSE_TAIL_N)}
    if pad:
        loops["copy_n"] = cdiv(num_nb, num_qb)  # the busiest program's v blocks
    launch(Launch(
        f"head_mixing_lse_tc[{SHORT[q.dtype]},H{H},Nq{NQ},Nk{NK},D{DQ}{',pad' if pad else ''}]", _lse_tc_kernel,
        (num_qb * B * H,),
        [qs, k, lse, *vargs[:3], *qs.stride(), *k.stride(), *vargs[3:], NQ, NK, H, num_qb, abs(scale) * _LOG2E],
        dict(DQ=DQ, DK=DK, KA=ka, KB=kb, DV=DV, VA=va, VB=vb, BLOCK_M=LSE_BLOCK_M, BLOCK_N=LSE_BLOCK_N,
             TAIL_N=LSE_TAIL_N, PAD_KV=pad),
        LSE_WARPS, 1, reads=(qs, k, *((v,) if pad else ())), writes=(lse, *((kp, vp) if pad else ())), loops=loops,
    ))  # fmt: skip
    return kp, vp


def head_mixing_attention_fwd_tc(
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
    copies: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward for 5-16 heads: (out (B, H, Nq, Dv) q.dtype, lse (B, H, Nq) float32).
    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv) float16 / bfloat16, any
    strides and alignment (rows that are not whole 16-byte vectors, e.g. DeepViT-S's
    heads of 33, are read from zero-padded copies: see below); pre_w,
    post_w (H, H) in nn.Linear's (out, in) convention or None; post_b (H,) or None;
    with has_norm the head norm (norm_w, norm_b (H,) or None, eps) on the post-mixed
    probabilities (``head_mixing.py``'s launcher contract). Where the forward reads k and
    v through zero-padded copies and ``copies`` is a dict, it puts them there as "k" and
    "v" (the backward can take them instead of making its own: ``saved_copy_shapes``)."""
    B, H, NQ, DK = q.shape
    NK, DV = k.shape[2], v.shape[3]
    if not MIN_HEADS <= H <= MAX_HEADS:
        raise ValueError(f"head_mixing (tensor-core forward): H={H} heads; expected {MIN_HEADS} to {MAX_HEADS}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"head_mixing (tensor-core forward): q.dtype={q.dtype}; expected float16 or bfloat16")
    if NK == 0:
        raise ValueError("head_mixing (tensor-core forward): Nk=0 keys; expected at least one")
    out = _alloc((B, H, NQ, DV), q.dtype, q.device)
    lse = _alloc((B, H, NQ), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    ka, kb = _k_split(DK)
    va, vb = _k_split(DV)
    dk, dv, named = DK, DV, (q, k)  # the launch's name: the caller's shapes
    # no pre-mix: each head's row statistics are its own (plain attention), computed by
    # _lse_tc_kernel a (b, h, 64 query rows) on the tensor cores; the fused kernel then
    # runs pass 2 only (bench/NOTES.md, 2026-12-02, m2stats)
    lse_in = pre_w is None
    pad = any(_width(t) == 1 for t in (q, k, v))
    if pad:
        # rows that are not whole 16-byte vectors (DeepViT-S: 33 16-bit elements, 66
        # bytes) are read element by element: with every key tile's loads, twice per
        # query block, M2's main loop took 761 instructions a tile, against 505 from
        # aligned rows of 48 (estimate, sm_90a: kernel 432 us unaligned, 280 padded;
        # bench/NOTES.md, 2026-12-01, tcnorm). k and v go through zero-padded contiguous
        # copies of the chunks' width (33 -> 32 + 16), made by one memory-bound launch
        # (~49 us at M2, estimate; two torch pads were ~26 us each; copies 40 wide took
        # ~44 us but made the kernel's loop ~8 instructions a tile longer (the column
        # mask): bench/NOTES.md, 2026-12-01, m2pad); q, read once per program, is read
        # as it is (its columns < DQ). Without a pre-mix the statistics launch below
        # makes the copies as it reads k (no launch of their own; bench/NOTES.md,
        # 2026-12-02, second session)
        dk, dv = ka + kb, va + vb
        if not lse_in:
            k, v = _pad_kv(k, v, dk, dv)

    def mat(w):
        return (q, 0, 0) if w is None else (w, w.stride(0), w.stride(1))

    def vec(x):
        return (q, 0) if x is None else (x, x.stride(0))

    (aw, *as_), (pw, *ps) = mat(pre_w), mat(post_w)
    if not has_norm:
        norm_w = norm_b = None
    (pbp, pbs), (nwp, nws), (nbp, nbs) = vec(post_b), vec(norm_w), vec(norm_b)
    hp = 8 if H <= 8 else 16
    # 5-8 heads: 32 query rows (estimate at CaiT-S-timm 143.5 -> 120.2 us, 128 -> 172
    # registers, sm_90a; 64 rows took 246 registers for 118.0 us); 9-16 heads: 16 (32
    # spilled 0.8-3 KB in the prototype)
    block_m = 32 if hp == 8 and NQ > 16 else BLOCK_M
    num_qb = cdiv(NQ, block_m)
    num_kb = cdiv(NK, BLOCK_N)
    params = (pre_w, post_w, post_b, *((norm_w, norm_b) if has_norm else ()))
    flags = dict(HAS_PRE=pre_w is not None, HAS_POST=post_w is not None, HAS_POST_B=post_b is not None,
                 HAS_NORM=has_norm, HAS_NORM_W=has_norm and norm_w is not None,
                 HAS_NORM_B=has_norm and norm_b is not None)  # fmt: skip
    tag = _tag(*named, params, flags)
    if lse_in:
        k, v = _row_lse(q, k, lse, scale, v, (dk, dv) if pad else None)
    args = [q, k, v, aw, pw, pbp, nwp, nbp, out, lse, *q.stride(), *k.stride(), *v.stride(), *as_, *ps, pbs,
            nws, nbs, NQ, NK, num_qb, scale * _LOG2E, float(eps)]  # fmt: skip
    constexprs = dict(H=H, HP=hp, DQ=DK, DK=dk, DV=dv, DO=DV, KA=ka, KB=kb, VA=va, VB=vb, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
                      **flags, LSE_IN=lse_in)  # fmt: skip
    loops = {"start_t": num_kb - 1, "end_t": 1}
    if not lse_in:
        loops["start_n"] = num_kb - 1  # pass 1
    launch(Launch(
        f"head_mixing_fwd_tc[{tag}]", _fwd_tc_kernel, (num_qb * B,), args, constexprs, NUM_WARPS, 1,
        reads=(q, k, v, *params, *((lse,) if lse_in else ())), writes=(out,) if lse_in else (out, lse), loops=loops,
    ))  # fmt: skip
    if pad and copies is not None:
        copies["k"], copies["v"] = k, v
    return out, lse


def saved_copy_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[tuple[int, ...], ...] | None:
    """The shapes of the zero-padded copies of k and v ((B, H, Nk, wk), (B, H, Nk, wv))
    that the triton backend's forward returns for its backward to save, or None where it
    returns none: for 5-16 heads of float16 / bfloat16 whose Dk or Dv is not a multiple of
    8 (rows that cannot be whole 16-byte vectors whatever the strides, e.g. DeepViT-S's
    33), the forward pads k and v anyway and the backward then needs no padding launch of
    its own (~49 us at M2, estimate; bench/NOTES.md, 2026-12-02, fourth session). From
    shapes and dtype alone, so that fake tensors (torch.compile, export) agree with the
    real run; other unaligned inputs (strides, offsets) the backward pads itself."""
    B, H, _, DK = q.shape
    NK, DV = k.shape[2], v.shape[3]
    if not MIN_HEADS <= H <= MAX_HEADS or q.dtype not in (torch.float16, torch.bfloat16) or not (DK % 8 or DV % 8):
        return None
    ka, kb = _k_split(DK)
    va, vb = _k_split(DV)
    return (B, H, NK, ka + kb), (B, H, NK, va + vb)


# ----------------------------------------------------------------------------
# backward for 5-16 heads (bench/NOTES.md, 2026-12-01, helper tcbwd). Recomputes from
# the saved lse, in the forward's tile (16 rows x 16 columns, 8 warps, heads padded to
# HP, the mixing a dot over the flattened tile):
#
#   _bwd_q_tc_kernel, a program per (b, 16 query rows), tiles (HP, queries, keys); q
#     and dO read once (any strides; with PAD_QO it stores their zero-padded copies,
#     _pad_kv's layout, for the dk / dv launches):
#     loop 1 over the key blocks: p, r, n, dn = dO.v, dr (the norm's backward), dp =
#       P^T dr; delta = sum_j p dp; the partial sums of dP = dr p^T, dc = dr, dw = dn x^,
#       dbeta = dn (dP a dot over the flattened tiles: (16, R) @ (R, 16))
#     loop 2: the same chain, dl = p (dp - delta), ds = A^T dl, dq += ds k, dA += dl s^T
#   _bwd_kv_tc_kernel, a program per (b, 16 keys), tiles (HP, keys, queries): loop over
#     the query blocks (lse and delta from memory): dv += n^T dO and the chain to ds,
#     dk += ds^T q (DO_DK / DO_DV: both, or one of them per launch)
#   head_mixing.py's _param_grad_kernel adds the partial sums in a fixed order (a
#     program per block of 64 columns).
#
# A padded position (a key >= Nk or a query >= Nq) has its mixed logit set to -inf
# (p = 0 exactly: inf * 0 must not reach a neighbour pair through the flattened mix
# dots) and the norm's x^ and rho zeroed (eps = 0 would make them NaN); a padded
# query's dO and a padded key's v are zero (masked loads), so dn is 0 there.


@triton.jit
def _flat(x3, dt: tl.constexpr, HP: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """(HP, R, C) -> the flattened (R*C*HP/16, 16) tile of _mix_tc, in dt."""
    return tl.reshape(tl.permute(x3.to(dt), (1, 2, 0)), (R * C * HP // 16, 16))


@triton.jit
def _fold(acc, HP: tl.constexpr):
    """(HP, HP) from a (16, 16) sum of flattened-tile outer products: at HP = 8 a
    flattened row holds two pairs' heads, so the two diagonal 8 x 8 blocks are added."""
    if HP == 16:
        return acc
    else:
        a = tl.arange(0, 16)
        keep = (a[:, None] // 8) == (a[None, :] // 8)
        x = tl.reshape(tl.where(keep, acc, 0.0), (2, 8, 2, 8))
        return tl.sum(tl.sum(x, 2), 0)


@triton.jit
def _chain_bwd(s2, lse2, dn, ok, wa, wp, wpt, pb, nw, nb, h_ok, eps, H: tl.constexpr, HP: tl.constexpr,
               R: tl.constexpr, C: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
               HAS_NORM: tl.constexpr):  # fmt: skip
    """One tile's chain: s2 (HP, R, C) the scaled logits in log2 units (before the
    pre-mix), lse2 broadcastable to it (log2 units), dn = dO.v, ok (R, C) the valid
    positions. Returns p, n, x^ (0 without the norm), dr, dp; with the post-mix and the
    norm (pb, nw, nb then per column of the flattened tile, ``_bwd_params``) the norm and
    its backward run on the post-mix's flattened tile (rows of one pair's heads, two
    pairs' at HP = 8: the head sums are row sums, as in ``_mix_norm_tc``), and x^, dr
    come back flattened (float32) with dn's: (p, n, x^f, drf, dp, pf, dnf, uf); otherwise
    pf and dnf are p and dn, uf is dr.

    The dP partial sums are uf^T @ pf, whatever the branch: with the norm, dr = rho u
    where rho = 1 / std over the heads can be huge (eps ~ 0 and nearly equal heads:
    |dr| ~ 7e5 in a float16 case whose float64 gradients are ~100), so dr is never
    rounded to 16 bits: dp = rho (P^T u) and the dP dot's operands are u and rho p
    (both bounded: |u| <= ~(H + 2) max |dn w|; rho p ~ 1 / |P| without a post-mix bias,
    <= rho otherwise), each rounded to the inputs' type."""
    if HAS_PRE:
        lg = _mix_tc(s2, wa, HP, R, C)
    else:
        lg = s2
    lg = tl.where(ok[None, :, :], lg, -float("inf"))
    p = tl.exp2(lg - lse2)
    if HAS_POST and HAS_NORM:
        pf = _flat(p, wp.dtype, HP, R, C)
        x = tl.dot(pf, wp) + pb[None, :]
        a = tl.arange(0, 16)
        valid = ((a % HP) < H)[None, :]
        xc = tl.where(valid, x - _seg_mean(x, H, HP), 0.0)
        rho = _rho(_seg_mean(xc * xc, H, HP) + eps)
        okf = tl.reshape(tl.permute(tl.broadcast_to(tl.where(ok, 1.0, 0.0)[None, :, :], (HP, R, C)), (1, 2, 0)),
                         (R * C * HP // 16, 16))  # fmt: skip
        rho = tl.where(okf > 0.5, rho, 0.0)
        xhat = xc * rho
        n = tl.permute(tl.reshape(xhat * nw[None, :] + nb[None, :], (R, C, HP)), (2, 0, 1))
        dnf = tl.reshape(tl.permute(dn, (1, 2, 0)), (R * C * HP // 16, 16))
        g = dnf * nw[None, :]
        uf = tl.where(valid, g - _seg_mean(g, H, HP) - xhat * _seg_mean(g * xhat, H, HP), 0.0)
        dr = rho * uf
        # rho per row (HP = 16) or per half-row (HP = 8, whose P^T is block-diagonal):
        # it commutes with the mix
        dp = tl.permute(tl.reshape(tl.dot(uf.to(wpt.dtype), wpt) * rho, (R, C, HP)), (2, 0, 1))
        pf = (pf.to(tl.float32) * rho).to(wp.dtype)
    else:
        if HAS_POST:
            r = _mix_tc(p, wp, HP, R, C) + pb[:, None, None]
        else:
            r = p
        if HAS_NORM:
            valid = h_ok[:, None, None]
            x = tl.where(valid, r, 0.0)
            mean = tl.sum(x, 0) * (1.0 / H)
            xc = tl.where(valid, x - mean[None, :, :], 0.0)
            rho = _rho(tl.sum(xc * xc, 0) * (1.0 / H) + eps)
            rho = tl.where(ok, rho, 0.0)
            xhat = xc * rho[None, :, :]
            n = xhat * nw[:, None, None] + nb[:, None, None]
            g = dn * nw[:, None, None]
            mg = tl.sum(g, 0) * (1.0 / H)
            mgx = tl.sum(g * xhat, 0) * (1.0 / H)
            dr = tl.where(valid, rho[None, :, :] * (g - mg[None, :, :] - xhat * mgx[None, :, :]), 0.0)
        else:
            xhat = tl.zeros_like(p)
            n = r
            dr = dn
        if HAS_POST:
            dp = _mix_tc(dr, wpt, HP, R, C)
        else:
            dp = dr
        pf = p
        dnf = dn
        uf = dr
    return p, n, xhat, dr, dp, pf, dnf, uf


@triton.jit
def _seg_mean(x, H: tl.constexpr, HP: tl.constexpr):
    """The mean over each pair's heads of a flattened (rows, 16) tile: row means at
    HP = 16, (rows, 1); at HP = 8 each half's, (rows, 16). Each half summed on its own:
    as the row's sum minus the other half's, a half of p ~1e-4 next to one of p ~1 lost
    its variance (~1e-8) to the float32 rounding of ~1 (bench/NOTES.md, 2026-12-02,
    second session)."""
    if HP == 16:
        return (tl.sum(x, 1) * (1.0 / H))[:, None]
    else:
        lo = (tl.arange(0, 16) < 8)[None, :]
        s_lo = tl.sum(tl.where(lo, x, 0.0), 1)
        s_hi = tl.sum(tl.where(lo, 0.0, x), 1)
        return tl.where(lo, s_lo[:, None], s_hi[:, None]) * (1.0 / H)


@triton.jit
def _fold16(v, HP: tl.constexpr):
    """(HP,) per-head sums from (16,) column sums of flattened tiles (HP = 8: columns
    h and h + 8 hold head h)."""
    if HP == 16:
        return v
    else:
        return tl.sum(tl.reshape(v, (2, 8)), 0)


@triton.jit
def _bwd_params(PRE_W, POST_W, POST_B, NORM_W, NORM_B, s_aw0, s_aw1, s_pw0, s_pw1, s_pb, s_nw, s_nb, hs, h_ok,
                H: tl.constexpr, HP: tl.constexpr, dt: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
                HAS_POST_B: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
                FLAT_NORM: tl.constexpr):  # fmt: skip
    """The mixing weights as _mix_tc operands (A, A^T, P, P^T) and pb, nw, nb float32:
    (HP,) per head, or with FLAT_NORM (the post-mix and the head norm) (16,) per column
    of the flattened tile."""
    if HAS_PRE:
        wa = _mix_weights(PRE_W, s_aw0, s_aw1, H, HP, dt)
        wat = _mix_weights(PRE_W, s_aw1, s_aw0, H, HP, dt)
    else:
        wa = tl.zeros((16, 16), dt)
        wat = wa
    if HAS_POST:
        wp = _mix_weights(POST_W, s_pw0, s_pw1, H, HP, dt)
        wpt = _mix_weights(POST_W, s_pw1, s_pw0, H, HP, dt)
    else:
        wp = tl.zeros((16, 16), dt)
        wpt = wp
    # with the post-mix and the norm (on the flattened tile): per column, head a % HP
    if FLAT_NORM:
        hn = tl.arange(0, 16) % HP
    else:
        hn = hs
    hn_ok = hn < H
    if HAS_POST_B:
        pb = tl.load(POST_B + hn * s_pb, mask=hn_ok, other=0.0).to(tl.float32)
    else:
        pb = tl.zeros(hn.shape, tl.float32)
    if HAS_NORM_W:
        nw = tl.load(NORM_W + hn * s_nw, mask=hn_ok, other=0.0).to(tl.float32)
    else:
        nw = tl.where(hn_ok, 1.0, 0.0)
    if HAS_NORM_B:
        nb = tl.load(NORM_B + hn * s_nb, mask=hn_ok, other=0.0).to(tl.float32)
    else:
        nb = tl.zeros(hn.shape, tl.float32)
    return wa, wat, wp, wpt, pb, nw, nb


@triton.jit
def _q_side_tile(qa, qb, da, db, Kb, Vb, hs, h_ok, m_ok, start_n, NK, s_kh, s_kn, s_kd, s_vh, s_vn, s_vd, lse2,
                 wa, wp, wpt, pb, nw, nb, eps, qk_scale, DK: tl.constexpr, DV: tl.constexpr, KA: tl.constexpr,
                 KB: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
                 HAS_NORM: tl.constexpr):  # fmt: skip
    """_bwd_q_tc_kernel's key tile start_n, the same in both its loops: the k tiles (ka,
    kb: kb is ka where KB = 0), the scaled logits s2, dn = dO.v and ``_chain_bwd``'s p,
    x^, dr, dp, pf, dnf, uf. lse2: the rows' lse in log2 units, (HP, BLOCK_M, 1)."""
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NK
    kok = h_ok[:, None] & n_ok[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    ka = _tile3(Kb, hs, offs_n, s_kh, s_kn, s_kd, 0, KA, DK, kok)
    s2 = tl.dot(qa, tl.permute(ka, (0, 2, 1)))
    if KB > 0:
        kb = _tile3(Kb, hs, offs_n, s_kh, s_kn, s_kd, KA, KB, DK, kok)
        s2 = tl.dot(qb, tl.permute(kb, (0, 2, 1)), s2)
    else:
        kb = ka
    s2 = s2 * qk_scale
    va = _tile3(Vb, hs, offs_n, s_vh, s_vn, s_vd, 0, VA, DV, kok)
    dn = tl.dot(da, tl.permute(va, (0, 2, 1)))
    if VB > 0:
        vb = _tile3(Vb, hs, offs_n, s_vh, s_vn, s_vd, VA, VB, DV, kok)
        dn = tl.dot(db, tl.permute(vb, (0, 2, 1)), dn)
    p, n, xhat, dr, dp, pf, dnf, uf = _chain_bwd(s2, lse2, dn, ok, wa, wp, wpt, pb, nw, nb, h_ok, eps, H,
                                                 HP, BLOCK_M, BLOCK_N, HAS_PRE, HAS_POST, HAS_NORM)  # fmt: skip
    return s2, ka, kb, dn, p, xhat, dr, dp, pf, dnf, uf


@triton.jit
def _store_rows(XP, b, hs, offs_m, qok, xa, xb, H: tl.constexpr, NQ, CA: tl.constexpr, CB: tl.constexpr):
    """The (HP, rows, CA + CB) tile [xa | xb] into rows offs_m of heads < H of the
    contiguous (B, H, NQ, CA + CB) XP (``_pad_kv``'s layout; xa / xb already zero past
    the operand's columns)."""
    ptrs = XP + ((b.to(tl.int64) * H + hs[:, None, None]) * NQ + offs_m[None, :, None]) * (CA + CB)
    tl.store(ptrs + tl.arange(0, CA)[None, None, :], xa, mask=qok[:, :, None])
    if CB > 0:
        tl.store(ptrs + CA + tl.arange(0, CB)[None, None, :], xb, mask=qok[:, :, None])


@triton.jit
def _bwd_q_tc_kernel(
    Q, K, V, DO, PRE_W, POST_W, POST_B, NORM_W, NORM_B, LSE, DELTA, DQ, PART, QP, DOP,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_on, s_od,
    s_aw0, s_aw1, s_pw0, s_pw1, s_pb, s_nw, s_nb,
    NQ, NK, num_qb, NPART, qk_scale, scale, eps,
    H: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DQO: tl.constexpr, DVO: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD_QO: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr, DEFER_SUMS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // num_qb
    qblk = pid % num_qb
    hs = tl.arange(0, HP)
    h_ok = hs < H
    offs_m = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < NQ
    qok = h_ok[:, None] & m_ok[None, :]
    Qb = Q + b.to(tl.int64) * s_qb
    Kb = K + b.to(tl.int64) * s_kb
    Vb = V + b.to(tl.int64) * s_vb
    DOb = DO + b.to(tl.int64) * s_ob
    dt = Q.dtype.element_ty
    # q and dO as they are (columns < DQO / DVO, any strides: read once per program)
    qa = _tile3(Qb, hs, offs_m, s_qh, s_qn, s_qd, 0, KA, DQO, qok)
    if KB > 0:
        qb = _tile3(Qb, hs, offs_m, s_qh, s_qn, s_qd, KA, KB, DQO, qok)
    else:
        qb = qa
    da = _tile3(DOb, hs, offs_m, s_oh, s_on, s_od, 0, VA, DVO, qok)
    if VB > 0:
        db = _tile3(DOb, hs, offs_m, s_oh, s_on, s_od, VA, VB, DVO, qok)
    else:
        db = da
    if PAD_QO:  # the dk / dv launches' zero-padded copies of this program's rows
        _store_rows(QP, b, hs, offs_m, qok, qa, qb, H, NQ, KA, KB)
        _store_rows(DOP, b, hs, offs_m, qok, da, db, H, NQ, VA, VB)
    wa, wat, wp, wpt, pb, nw, nb = _bwd_params(PRE_W, POST_W, POST_B, NORM_W, NORM_B, s_aw0, s_aw1, s_pw0, s_pw1,
                                               s_pb, s_nw, s_nb, hs, h_ok, H, HP, dt, HAS_PRE, HAS_POST,
                                               HAS_POST_B, HAS_NORM_W, HAS_NORM_B, HAS_POST and HAS_NORM)  # fmt: skip
    row = (b.to(tl.int64) * H + hs[:, None]) * NQ + offs_m[None, :]
    # (HP, BLOCK_M, 1): expanded here, not in the loops' tile (where triton 3.6 failed to
    # compile the head norm without a post-mix at 9-16 heads: "operand #0 does not
    # dominate this use")
    lse2 = (tl.load(LSE + row, mask=qok, other=0.0) * 1.4426950408889634)[:, :, None]
    num_kb = tl.cdiv(NK, BLOCK_N)

    # loop 1: delta and the partial sums of dP, dc, dw, dbeta. With DEFER_SUMS the sums
    # over the keys are taken elementwise over the tiles and across the lanes once,
    # after the loop (fewer instructions a tile: 941 -> 810 in a probe at M2's shape,
    # estimate; M2 itself keeps the per-tile sums, which the launcher chooses where the
    # deferred ones spilled: bench/NOTES.md, 2026-12-03); else each tile's
    delta = tl.zeros((HP, BLOCK_M), tl.float32)
    acc_p = tl.zeros((16, 16), tl.float32)
    acc_c = tl.zeros((HP, BLOCK_M), tl.float32)
    acc_w = tl.zeros((HP, BLOCK_M), tl.float32)
    acc_b = tl.zeros((HP, BLOCK_M), tl.float32)
    acc_c16 = tl.zeros((16,), tl.float32)
    acc_w16 = tl.zeros((16,), tl.float32)
    if DEFER_SUMS:
        t_delta = tl.zeros((HP, BLOCK_M, BLOCK_N), tl.float32)
        t_c = tl.zeros((HP, BLOCK_M, BLOCK_N), tl.float32)
        t_w = tl.zeros((HP, BLOCK_M, BLOCK_N), tl.float32)
        t_b = tl.zeros((HP, BLOCK_M, BLOCK_N), tl.float32)
        t_c16 = tl.zeros((BLOCK_M * BLOCK_N * HP // 16, 16), tl.float32)
        t_w16 = tl.zeros((BLOCK_M * BLOCK_N * HP // 16, 16), tl.float32)
    for start_a in range(0, num_kb):
        s2, ka, kb, dn, p, xhat, dr, dp, pf, dnf, uf = _q_side_tile(
            qa, qb, da, db, Kb, Vb, hs, h_ok, m_ok, start_a, NK, s_kh, s_kn, s_kd, s_vh, s_vn, s_vd, lse2, wa, wp, wpt,
            pb, nw, nb, eps, qk_scale, DK, DV, KA, KB, VA, VB, H, HP, BLOCK_M, BLOCK_N, HAS_PRE, HAS_POST,
            HAS_NORM)  # fmt: skip
        if DEFER_SUMS:
            t_delta += p * dp
            if HAS_POST and HAS_NORM:  # dr, x^ (and pf, dnf) flattened: column sums
                acc_p = tl.dot(tl.trans(uf.to(dt)), pf, acc_p)  # dr p^T as u (rho p)^T
                if HAS_POST_B:
                    t_c16 += dr
                if HAS_NORM_W:
                    t_w16 += dnf * xhat
            else:
                if HAS_POST:  # (one line: the compile budget finds a tl.dot by its source line)
                    drf = tl.trans(_flat(dr, dt, HP, BLOCK_M, BLOCK_N))
                    acc_p = tl.dot(drf, _flat(p, dt, HP, BLOCK_M, BLOCK_N), acc_p)
                if HAS_POST_B:
                    t_c += dr
                if HAS_NORM_W:
                    t_w += dn * xhat
            if HAS_NORM_B:
                t_b += dn
        else:
            delta += tl.sum(p * dp, 2)
            if HAS_POST and HAS_NORM:
                acc_p = tl.dot(tl.trans(uf.to(dt)), pf, acc_p)
                if HAS_POST_B:
                    acc_c16 += tl.sum(dr, 0)
                if HAS_NORM_W:
                    acc_w16 += tl.sum(dnf * xhat, 0)
            else:
                if HAS_POST:  # (one line: the compile budget finds a tl.dot by its source line)
                    drf = tl.trans(_flat(dr, dt, HP, BLOCK_M, BLOCK_N))
                    acc_p = tl.dot(drf, _flat(p, dt, HP, BLOCK_M, BLOCK_N), acc_p)
                if HAS_POST_B:
                    acc_c += tl.sum(dr, 2)
                if HAS_NORM_W:
                    acc_w += tl.sum(dn * xhat, 2)
            if HAS_NORM_B:
                acc_b += tl.sum(dn, 2)
    if DEFER_SUMS:
        delta = tl.sum(t_delta, 2)
        acc_c = tl.sum(t_c, 2)
        acc_w = tl.sum(t_w, 2)
        acc_b = tl.sum(t_b, 2)
        acc_c16 = tl.sum(t_c16, 0)
        acc_w16 = tl.sum(t_w16, 0)
    tl.store(DELTA + row, delta, mask=qok)

    # loop 2: dq and the partial sums of dA
    acc_a = tl.zeros((16, 16), tl.float32)
    dqa = tl.zeros((HP, BLOCK_M, KA), tl.float32)
    dqb = tl.zeros((HP, BLOCK_M, KB if KB > 0 else 16), tl.float32)
    for start_b in range(0, num_kb):
        s2, ka, kb, dn, p, xhat, dr, dp, pf, dnf, uf = _q_side_tile(
            qa, qb, da, db, Kb, Vb, hs, h_ok, m_ok, start_b, NK, s_kh, s_kn, s_kd, s_vh, s_vn, s_vd, lse2, wa, wp, wpt,
            pb, nw, nb, eps, qk_scale, DK, DV, KA, KB, VA, VB, H, HP, BLOCK_M, BLOCK_N, HAS_PRE, HAS_POST,
            HAS_NORM)  # fmt: skip
        dl = p * (dp - delta[:, :, None])
        if HAS_PRE:
            acc_a = tl.dot(tl.trans(_flat(dl, dt, HP, BLOCK_M, BLOCK_N)), _flat(s2, dt, HP, BLOCK_M, BLOCK_N), acc_a)
            ds = _mix_tc(dl, wat, HP, BLOCK_M, BLOCK_N)
        else:
            ds = dl
        ds = ds.to(dt)
        dqa = tl.dot(ds, ka, dqa)
        if KB > 0:
            dqb = tl.dot(ds, kb, dqb)

    # dq (B, H, NQ, DQO) contiguous
    DQb = DQ + b.to(tl.int64) * H * NQ * DQO
    q_ptrs = DQb + hs[:, None, None] * (NQ * DQO) + offs_m[None, :, None] * DQO
    cols_a = tl.arange(0, KA)
    tl.store(q_ptrs + cols_a[None, None, :], (dqa * scale).to(dt), mask=qok[:, :, None] & (cols_a < DQO)[None, None, :])
    if KB > 0:
        cols_b = KA + tl.arange(0, KB)
        tl.store(q_ptrs + cols_b[None, None, :], (dqb * scale).to(dt),
                 mask=qok[:, :, None] & (cols_b < DQO)[None, None, :])  # fmt: skip
    # this program's row of partial sums: [dP (HP x HP, [f, g]), dc, dw, dbeta, dA ([g, h])]
    Pr = PART + pid.to(tl.int64) * NPART
    mat = hs[:, None] * HP + hs[None, :]
    if HAS_POST:
        tl.store(Pr + mat, _fold(acc_p, HP))
    if HAS_POST and HAS_NORM:
        if HAS_POST_B:
            tl.store(Pr + HP * HP + hs, _fold16(acc_c16, HP))
        if HAS_NORM_W:
            tl.store(Pr + HP * HP + HP + hs, _fold16(acc_w16, HP))
    else:
        if HAS_POST_B:
            tl.store(Pr + HP * HP + hs, tl.sum(acc_c, 1))
        if HAS_NORM_W:
            tl.store(Pr + HP * HP + HP + hs, tl.sum(acc_w, 1))
    if HAS_NORM_B:
        tl.store(Pr + HP * HP + 2 * HP + hs, tl.sum(acc_b, 1))
    if HAS_PRE:
        tl.store(Pr + HP * HP + 3 * HP + mat, _fold(acc_a, HP) * 0.6931471805599453)


@triton.jit
def _bwd_kv_tc_kernel(
    Q, K, V, DO, PRE_W, POST_W, POST_B, NORM_W, NORM_B, LSE, DELTA, DK_, DV_,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_on, s_od,
    s_aw0, s_aw1, s_pw0, s_pw1, s_pb, s_nw, s_nb,
    NQ, NK, num_kb, qk_scale, scale, eps,
    H: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DKO: tl.constexpr, DVO: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
    DK_CHUNK: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
):  # fmt: skip
    # DK_CHUNK (with DO_DK): 0 both of dk's column chunks, 1 the first (KA), 2 the second (KB)
    pid = tl.program_id(0)
    b = pid // num_kb
    kblk = pid % num_kb
    hs = tl.arange(0, HP)
    h_ok = hs < H
    offs_n = kblk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NK
    kok = h_ok[:, None] & n_ok[None, :]
    Qb = Q + b.to(tl.int64) * s_qb
    Kb = K + b.to(tl.int64) * s_kb
    Vb = V + b.to(tl.int64) * s_vb
    DOb = DO + b.to(tl.int64) * s_ob
    dt = Q.dtype.element_ty
    ka = _tile3(Kb, hs, offs_n, s_kh, s_kn, s_kd, 0, KA, DK, kok)
    if KB > 0:
        kb = _tile3(Kb, hs, offs_n, s_kh, s_kn, s_kd, KA, KB, DK, kok)
    else:
        kb = ka
    va = _tile3(Vb, hs, offs_n, s_vh, s_vn, s_vd, 0, VA, DV, kok)
    if VB > 0:
        vb = _tile3(Vb, hs, offs_n, s_vh, s_vn, s_vd, VA, VB, DV, kok)
    else:
        vb = va
    wa, wat, wp, wpt, pb, nw, nb = _bwd_params(PRE_W, POST_W, POST_B, NORM_W, NORM_B, s_aw0, s_aw1, s_pw0, s_pw1,
                                               s_pb, s_nw, s_nb, hs, h_ok, H, HP, dt, HAS_PRE, HAS_POST,
                                               HAS_POST_B, HAS_NORM_W, HAS_NORM_B, HAS_POST and HAS_NORM)  # fmt: skip
    dka = tl.zeros((HP, BLOCK_N, KA), tl.float32)
    dkb = tl.zeros((HP, BLOCK_N, KB if KB > 0 else 16), tl.float32)
    dva = tl.zeros((HP, BLOCK_N, VA), tl.float32)
    dvb = tl.zeros((HP, BLOCK_N, VB if VB > 0 else 16), tl.float32)
    num_qb = tl.cdiv(NQ, BLOCK_M)
    for start_m in range(0, num_qb):
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < NQ
        qok = h_ok[:, None] & m_ok[None, :]
        ok = n_ok[:, None] & m_ok[None, :]
        qa = _tile3(Qb, hs, offs_m, s_qh, s_qn, s_qd, 0, KA, DK, qok)
        s2 = tl.dot(ka, tl.permute(qa, (0, 2, 1)))
        if KB > 0:
            qb = _tile3(Qb, hs, offs_m, s_qh, s_qn, s_qd, KA, KB, DK, qok)
            s2 = tl.dot(kb, tl.permute(qb, (0, 2, 1)), s2)
        s2 = s2 * qk_scale
        row = (b.to(tl.int64) * H + hs[:, None]) * NQ + offs_m[None, :]
        lse2 = tl.load(LSE + row, mask=qok, other=0.0) * 1.4426950408889634
        da = _tile3(DOb, hs, offs_m, s_oh, s_on, s_od, 0, VA, DV, qok)
        if DO_DK:
            dn = tl.dot(va, tl.permute(da, (0, 2, 1)))
        if VB > 0:
            db = _tile3(DOb, hs, offs_m, s_oh, s_on, s_od, VA, VB, DV, qok)
            if DO_DK:
                dn = tl.dot(vb, tl.permute(db, (0, 2, 1)), dn)
        if not DO_DK:
            dn = tl.zeros_like(s2)
        p, n, xhat, dr, dp, pf, dnf, uf = _chain_bwd(s2, lse2[:, None, :], dn, ok, wa, wp, wpt, pb, nw, nb, h_ok, eps,
                                                     H, HP, BLOCK_N, BLOCK_M, HAS_PRE, HAS_POST, HAS_NORM)  # fmt: skip
        if DO_DV:
            n = n.to(dt)
            dva = tl.dot(n, da, dva)
            if VB > 0:
                dvb = tl.dot(n, db, dvb)
        if DO_DK:
            delta = tl.load(DELTA + row, mask=qok, other=0.0)
            dl = p * (dp - delta[:, None, :])
            if HAS_PRE:
                ds = _mix_tc(dl, wat, HP, BLOCK_N, BLOCK_M)
            else:
                ds = dl
            ds = ds.to(dt)
            if DK_CHUNK != 2:
                dka = tl.dot(ds, qa, dka)
            if KB > 0 and DK_CHUNK != 1:
                dkb = tl.dot(ds, qb, dkb)
    # dk (B, H, NK, DKO), dv (B, H, NK, DVO) contiguous; a padded key's rows not stored
    if DO_DK:
        base = DK_ + b.to(tl.int64) * H * NK * DKO + hs[:, None, None] * (NK * DKO) + offs_n[None, :, None] * DKO
        if DK_CHUNK != 2:
            cols_a = tl.arange(0, KA)
            tl.store(base + cols_a[None, None, :], (dka * scale).to(dt),
                     mask=kok[:, :, None] & (cols_a < DKO)[None, None, :])  # fmt: skip
        if KB > 0 and DK_CHUNK != 1:
            cols_b = KA + tl.arange(0, KB)
            tl.store(base + cols_b[None, None, :], (dkb * scale).to(dt),
                     mask=kok[:, :, None] & (cols_b < DKO)[None, None, :])  # fmt: skip
    if DO_DV:
        base = DV_ + b.to(tl.int64) * H * NK * DVO + hs[:, None, None] * (NK * DVO) + offs_n[None, :, None] * DVO
        cols_a = tl.arange(0, VA)
        tl.store(base + cols_a[None, None, :], dva.to(dt), mask=kok[:, :, None] & (cols_a < DVO)[None, None, :])
        if VB > 0:
            cols_b = VA + tl.arange(0, VB)
            tl.store(base + cols_b[None, None, :], dvb.to(dt), mask=kok[:, :, None] & (cols_b < DVO)[None, None, :])


def head_mixing_attention_bwd_tc(
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
    copies: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Backward for 5-16 heads: (dq, dk, dv, d_pre_w, d_post_w, d_post_b, d_norm_w,
    d_norm_b), ``head_mixing.py``'s launcher contract (dq, dk, dv contiguous in q.dtype;
    the parameter gradients in their dtypes, None where the parameter is). lse: the
    forward's (B, H, Nq) float32. Inputs as the forward's (any strides and alignment).
    ``copies``: the forward's zero-padded copies of k and v (``saved_copy_shapes``),
    read instead of padding k and v again where rows are not whole 16-byte vectors."""
    B, H, NQ, DK = q.shape
    NK, DV = k.shape[2], v.shape[3]
    if not MIN_HEADS <= H <= MAX_HEADS:
        raise ValueError(f"head_mixing (tensor-core backward): H={H} heads; expected {MIN_HEADS} to {MAX_HEADS}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"head_mixing (tensor-core backward): q.dtype={q.dtype}; expected float16 or bfloat16")
    if NK == 0:
        raise ValueError("head_mixing (tensor-core backward): Nk=0 keys; expected at least one")
    dev = q.device
    dq = _alloc((B, H, NQ, DK), q.dtype, dev)
    dk = _alloc((B, H, NK, DK), q.dtype, dev)
    dv = _alloc((B, H, NK, DV), q.dtype, dev)
    if not has_norm:
        norm_w = norm_b = None
    params = (pre_w, post_w, post_b, norm_w, norm_b)

    def out(t):
        return None if t is None else _alloc(tuple(t.shape), t.dtype, dev)

    grads = [out(t) for t in params]
    if B == 0 or NQ == 0:
        for g in (dk, dv, *grads):
            if g is not None:
                g.zero_()
        return dq, dk, dv, *grads
    hp = 8 if H <= 8 else 16
    (ka, kb), (va, vb) = _bwd_chunks(DK, hp), _bwd_chunks(DV, hp)
    named = (q, k)  # the launch's name: the caller's shapes
    dkr, dvr = DK, DV
    q_in, go_in = q, grad_out  # the dq launch reads q and dO as they are
    pad = any(_width(t) == 1 for t in (q, k, v, grad_out))
    if pad:
        # rows that are not whole 16-byte vectors (DeepViT-S's heads of 33) are read
        # from zero-padded copies of the chunks' width, as in the forward, where a
        # launch reads them in every loop step: k and v (every launch) through the
        # forward's copies where it saved them, else ``_pad_kv``'s; q and dO (the dk /
        # dv launches) through copies the dq launch, which reads them once per program,
        # writes of its rows (no launch of their own: ~49 us at M2, estimate;
        # bench/NOTES.md, 2026-12-02, padfuse)
        k, v = _pad_kv(k, v, ka + kb, va + vb) if copies is None else _check_copies(copies, k, v, ka + kb, va + vb)
        q = _alloc((B, H, NQ, ka + kb), q.dtype, dev)
        grad_out = _alloc((B, H, NQ, va + vb), grad_out.dtype, dev)
        dkr, dvr = ka + kb, va + vb

    def mat(w):
        return (q, 0, 0) if w is None else (w, w.stride(0), w.stride(1))

    def vec(x):
        return (q, 0) if x is None else (x, x.stride(0))

    (aw, *as_), (pw, *ps) = mat(pre_w), mat(post_w)
    (pbp, pbs), (nwp, nws), (nbp, nbs) = vec(post_b), vec(norm_w), vec(norm_b)
    flags = dict(HAS_PRE=pre_w is not None, HAS_POST=post_w is not None, HAS_POST_B=post_b is not None,
                 HAS_NORM=has_norm, HAS_NORM_W=norm_w is not None, HAS_NORM_B=norm_b is not None)  # fmt: skip
    tag = _tag(*named, tuple(t for t in params), flags)
    qk_scale = scale * _LOG2E
    kv_strides = [*k.stride(), *v.stride()]
    rest = [*as_, *ps, pbs, nws, nbs]
    common = [*q.stride(), *kv_strides, *grad_out.stride(), *rest]
    common_q = [*q_in.stride(), *kv_strides, *go_in.stride(), *rest]
    ptrs = [aw, pw, pbp, nwp, nbp]
    consts = dict(H=H, HP=hp, DK=dkr, DV=dvr, KA=ka, KB=kb, VA=va, VB=vb, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **flags)
    num_qb = cdiv(NQ, BLOCK_M)
    num_kb = cdiv(NK, BLOCK_N)
    delta = _alloc((B, H, NQ), torch.float32, dev)
    npart = 2 * hp * hp + 3 * hp
    part = _alloc((B * num_qb, npart), torch.float32, dev)
    reads = (q, k, v, grad_out, *(t for t in params if t is not None), lse)
    copies = (q, grad_out) if pad else ()
    launch(Launch(
        f"head_mixing_bwd_q_tc[{tag}]", _bwd_q_tc_kernel, (num_qb * B,),
        [q_in, k, v, go_in, *ptrs, lse, delta, dq, part, *(copies or (q_in, go_in)), *common_q, NQ, NK, num_qb,
         npart, qk_scale, scale, float(eps)],
        # the sums after the loop but with the head norm at 9-16 heads (HP = 16) or after a
        # pre-mix: there they spilled (triton 3.9: re-attention at 12 / 16 heads of 48
        # 0 -> 16 / 32 B, of 32-40 4-16 B, M2 itself at 252 registers; at 12 heads of
        # 64 with the pre-mix 40 -> 96 B; bench/NOTES.md, 2026-12-03)
        dict(consts, DQO=DK, DVO=DV, PAD_QO=pad, DEFER_SUMS=not (has_norm and (hp == 16 or flags["HAS_PRE"]))),
        NUM_WARPS, 1,
        reads=(q_in, k, v, go_in, *reads[4:]), writes=(dq, delta, part, *copies),
        loops={"start_a": num_kb, "start_b": num_kb},
    ))  # fmt: skip
    for do_dk, do_dv, chunk in _kv_split(hp, (ka, kb), NQ == 1):
        what = "dkdv" if do_dk and do_dv else f"dk{('', 'a', 'b')[chunk]}" if do_dk else "dv"
        launch(Launch(
            f"head_mixing_bwd_{what}_tc[{tag}]", _bwd_kv_tc_kernel, (num_kb * B,),
            [q, k, v, grad_out, *ptrs, lse, delta, dk, dv, *common, NQ, NK, num_kb, qk_scale, scale, float(eps)],
            dict(consts, DKO=DK, DVO=DV, DO_DK=do_dk, DO_DV=do_dv, DK_CHUNK=chunk), NUM_WARPS, 1,
            reads=(*reads, delta) if do_dk else reads,
            writes=tuple(t for t, on in ((dk, do_dk), (dv, do_dv)) if on),
            loops={"start_m": num_qb},
        ))  # fmt: skip
    if any(g is not None for g in grads):
        block_r, block_c = _PARAM_BLOCK
        launch(Launch(
            f"head_mixing_bwd_params_tc[{tag}]", _param_grad_kernel, (cdiv(npart, block_c),),
            [part, *(part if g is None else g for g in grads), part.shape[0], npart],
            dict(H=H, HP=hp, BLOCK_R=block_r, BLOCK_C=block_c, HAS_PRE=flags["HAS_PRE"],
                 HAS_POST=flags["HAS_POST"], HAS_POST_B=flags["HAS_POST_B"],
                 HAS_NORM_W=flags["HAS_NORM_W"], HAS_NORM_B=flags["HAS_NORM_B"]),
            4, 1, reads=(part,), writes=tuple(g for g in grads if g is not None),
            loops={"start_r": cdiv(part.shape[0], block_r)},
        ))  # fmt: skip
    return dq, dk, dv, *grads


def _check_copies(copies, k: torch.Tensor, v: torch.Tensor, wk: int, wv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's padded copies of k and v, checked against k and v's shapes."""
    kp, vp = copies
    want = ((*k.shape[:3], wk), (*v.shape[:3], wv))
    for name, t, shape, like in (("k", kp, want[0], k), ("v", vp, want[1], v)):
        if tuple(t.shape) != shape or t.dtype != like.dtype or not t.is_contiguous() or t.device != like.device:
            raise ValueError(f"head_mixing (tensor-core backward): the padded copy of {name} is {_shape(t)} "
                             f"{t.dtype} (contiguous: {t.is_contiguous()}, {t.device}); expected a contiguous "
                             f"({', '.join(map(str, shape))}) {like.dtype} on {like.device}")  # fmt: skip
    return kp, vp


# head_mixing.py's _param_grad_kernel: rows a step, columns a program (at HP = 16 a row
# has 560 columns, which in one program spilled 5.8 KB on sm_80; tests shrink it)
_PARAM_BLOCK = (64, 64)


def _bwd_chunks(d: int, hp: int) -> tuple[int, int]:
    """The backward's column chunks of a head dim d: ``_k_split``'s, but at HP = 16 none
    wider than 32 (heads of 64 as 32 + 32, as heads of 49-63 already are): one chunk of 64
    spilled there (re-attention at 16 heads of 64, vit-pytorch's DeepViT, the dq launch
    20 B and the dv launch 32 B; sm_90a, triton 3.9; bench/NOTES.md, 2026-12-03)."""
    a, b = _k_split(d)
    return (32, 32) if hp == 16 and a == 64 else (a, b)


def _kv_split(hp: int, dk_chunks: tuple[int, int], one_query: bool) -> tuple[tuple[bool, bool, int], ...]:
    """The dk / dv launches as (DO_DK, DO_DV, DK_CHUNK): dk and dv in one launch, or one
    each: at HP = 16 the launch of both spilled (M2 92 B, CaiT-M 20 B; sm_90a, triton
    3.9: the accumulators of both and the loop-invariant k and v tiles of 16 heads); at
    HP = 8 one launch fits (164 registers). At HP = 16 with dk in two chunks of 32
    (heads of 49-64) dk's chunks take a launch each, the logits' chain formed in both:
    with both accumulators the dk launch spilled 8-84 B across the kinds (bench/NOTES.md,
    2026-12-03). At one query (CaiT's class attention; Nq = 1 is a constant to Triton,
    so the query loop runs once and carries nothing) one launch of both compiles clean
    (75-183 registers) and reads k and v once: these launches are memory-bound there
    (talking heads at 16 heads of 64, 197 keys: 205.5 -> 154.2 us, estimate;
    bench/NOTES.md, 2026-12-03, sixth session)."""
    if hp == 8 or one_query:
        return ((True, True, 0),)
    if dk_chunks == (32, 32):
        return ((True, False, 1), (True, False, 2), (False, True, 0))
    return ((True, False, 0), (False, True, 0))
