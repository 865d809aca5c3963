"""Triton kernels for relpos_attention: LeViT attention with a relative-position bias.

Launcher contract (the CUDA extension's ops ``relpos_attention_fwd`` and
``relpos_attention_bwd`` take the same positional arguments and return the same
tensors):

``relpos_attention_fwd(q, k, v, table, fmap_rows, fmap_cols, q_stride, scale, bias_scale)``
    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv): one dtype (float16,
    bfloat16 or float32), any strides (e.g. views of a 1x1 conv output).
    table (H, R*C): float16, bfloat16 or float32, any strides (the "nh" layout
    arrives as the transposed view of its (R*C, H) weight).
    fmap_rows R, fmap_cols C, q_stride s (ints): Nk = R*C, Nq = ceil(R/s)*ceil(C/s).
    scale, bias_scale (floats): logits = scale * q.k + bias_scale * table[h, |dr|*C + |dc|].
    Returns out (B, H, Nq, Dv) contiguous in q.dtype and lse (B, H, Nq)
    contiguous float32, the natural-log logsumexp of each row of logits.

``relpos_attention_bwd(grad_out, q, k, v, table, out, lse, fmap_rows, fmap_cols, q_stride,
scale, bias_scale)``
    grad_out and out (B, H, Nq, Dv) any strides; the other arguments as for fwd,
    lse as fwd returned it.
    Returns dq (B, H, Nq, Dk), dk (B, H, Nk, Dk), dv (B, H, Nk, Dv) contiguous in
    q.dtype and dtable (H, R*C) contiguous in table.dtype.

Kernels (FlashAttention-2 style; no (B, H, Nq, Nk) logits or probability tensor is
ever in memory):

* ``_tile_bias_kernel`` (forward and backward): every call first expands the table
  into a float32 bias per head, -inf at padded keys (query i at grid position
  (s*(i // Cq), s*(i % Cq)), key j at (j // C, j % C)), in the tiles its attention
  kernel reads, each stored in the order that a coalesced load, permuted back in
  registers, puts in the MMA accumulator's layout (``_bias_tile``). The forward's
  tiles are (queries, keys), divided by the scale (times bias_scale / scale); the dK/dV
  kernel's (keys, queries), the same on sm_90a for a scale not near 0 (else in log2
  units, times bias_scale * log2(e)). Built from the table on
  every call, never cached, so never stale; the forward and dK/dV kernels load its
  tiles instead of gathering from the table (except where they have one key block,
  resp. one query block: there they gather it, and the call has no bias launch).
  The backward has no bias launch either where the all-keys dQ kernel runs before
  dK/dV: each of its programs first writes a chunk of the dK/dV tiles
  (``_tile_bias_chunk``, from the same call's table).
* ``_fwd_kernel``: a program per (b, h, query block), online softmax in float32
  over key blocks (any Nk: full blocks unmasked, the first without a rescale, the
  keys after them in one masked block of the next power of 2, e.g. 196 = 3 x 64 +
  16), saves the logsumexp. The bias / scale is the QK^T dot's accumulator, so a
  score costs a max, one fma (c * s - c * m, c = scale * log2(e) > 0) and an exp2.
  Where every key fits one key block (Nk <= 64) a program gathers its one bias tile
  from the table itself, once for a group of batch entries, and the forward has no
  bias launch.
* ``_bwd_dq_kernel``: dQ, the table gradient and delta = rowsum(dO * O) per query
  (for the dK/dV kernel, launched after it). A program takes a query block
  aligned to grid rows (QR query-grid rows of CQP column slots), every key (TRP
  key-grid rows of CP slots) and a group of batch entries, one per iteration; its
  tiles are transposed, keys the rows. The bias tile is gathered from the table
  once per program, and dS is summed over the group in registers. After the loop
  the sum, a 4-d array (kr, kc, qr, qc) whose table column is |dr|*C + |dc| (dr
  depending on (qr, kr) only, dc on (qc, kc) only), is reduced once: a skew gather
  lines up every (qr, kr) block by signed column offset dc = kc - s*qc and sums
  over qc, then the blocks are added into their |dr| rows. Each program writes the
  result, indexed by (|dr|, dc), to its own row of a float32 buffer (programs, H,
  R, offsets).
* ``_bwd_dkdv_kernel``: a program per (b, h, key block), loops over query blocks
  (the last, partial one masked), reading delta instead of recomputing it from O.
  Then it folds the table gradient (``_fold_entry``): each program takes an entry
  of dtable (round-robin where they outnumber the programs), sums that buffer over
  the dQ programs (a fixed-order tree sum) and folds dc into |dc|. No atomics: the
  table gradient is deterministic (run to run, for a fixed config).
* ``_fold_kernel``: the same fold as a launch of its own, where the dQ kernel also
  writes dK and dV (small grids) and no dK/dV kernel runs.
* ``_bwd_fused_kernel`` (small heads on large grids, sm_90: A5): the whole backward in
  one pass instead of the dQ and dK/dV kernels (each recomputing P). A program per
  head and group of batch entries walks 32-query-slot blocks against every key: dQ
  stored per block, dK and dV summed in registers, dS reduced per block into the table
  partial by a tensor-core dot with a one-hot matrix of column offsets. Its bias tiles
  come from ``_fused_bias_kernel`` (launched first), its partials go to ``_fold_kernel``.

Configs come from small deterministic heuristics of the shape (``_fwd_cfg``,
``_dkdv_cfg``, ``_dq_cfg``) for a GPU tuning pass to revise; no autotuning.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from vitkernels.triton._common import (
    SHORT,
    TRITON_36,
    Launch,
    TensorFactory,
    alloc,
    cdiv,
    dot_precision,
    float32_tiles,
    launch,
    target_arch,
)
from vitkernels.workloads import RelposShape

__all__ = ["record_calls", "relpos_attention_bwd", "relpos_attention_fwd"]

_TRITON_36 = TRITON_36  # the fused backward's K^T (_bwd_fused_kernel); tests patch it here

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------
# kernels (every tl.dot takes input_precision=PREC: "tf32x3" for float32 inputs, near-
# float32 products on tensor cores, or "ieee" (exact float32 products on CUDA cores) in
# float32's key-blocked dQ on grids of more than 64 key slots, sm_90a (``_dq_cfg``);
# float16/bfloat16 inputs ignore it)


@triton.jit
def _tile_bias_kernel(
    T, BIAS,
    stride_th, stride_tn,
    mult,  # the forward's bias_scale / scale; the backward's bias_scale * log2(e) (log2 units)
    NQ: tl.constexpr, NK: tl.constexpr, CQ: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NC_FULL: tl.constexpr, TAIL_C: tl.constexpr,
    KEY_ROWS: tl.constexpr,
):  # fmt: skip
    """The bias mult * table[h, |dr|*C + |dc|] in float32, as an attention kernel reads
    it: per (head, row block of BLOCK_R) its column tiles one after another, BLOCK_C
    columns each over [0, NC_FULL), then one of TAIL_C columns (if any), each tile
    BLOCK_R x width floats in the order ``_bias_tile`` reads back. Rows are queries and
    columns keys (the forward's tiles), or with KEY_ROWS keys and queries (the dK/dV
    kernel's). -inf where no key is, 0 where no query is (finite; those outputs are not
    stored). A program per tile."""
    NUM_RB: tl.constexpr = ((NK if KEY_ROWS else NQ) + BLOCK_R - 1) // BLOCK_R
    NUM_FULL: tl.constexpr = NC_FULL // BLOCK_C
    NUM_CT: tl.constexpr = NUM_FULL + (1 if TAIL_C > 0 else 0)
    pid = tl.program_id(0)
    ct = pid % NUM_CT
    hr = pid // NUM_CT  # h * NUM_RB + row block
    r0 = hr % NUM_RB * BLOCK_R
    h = hr // NUM_RB
    tile = BIAS + hr.to(tl.int64) * (BLOCK_R * (NC_FULL + TAIL_C)) + ct * (BLOCK_R * BLOCK_C)
    if ct < NUM_FULL:
        _tile_bias_store(T, tile, stride_th, stride_tn, h, r0, ct * BLOCK_C, mult, NQ, NK, CQ, C, S, BLOCK_R, BLOCK_C,
                         KEY_ROWS)  # fmt: skip
    elif TAIL_C > 0:  # (no tail: no tail code, W = 0 does not compile)
        _tile_bias_store(T, tile, stride_th, stride_tn, h, r0, NC_FULL, mult, NQ, NK, CQ, C, S, BLOCK_R, TAIL_C,
                         KEY_ROWS)  # fmt: skip


@triton.jit
def _tile_bias_store(T, tile, stride_th, stride_tn, h, r0, c0, mult, NQ: tl.constexpr, NK: tl.constexpr,
                     CQ: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BM: tl.constexpr, W: tl.constexpr,
                     KEY_ROWS: tl.constexpr):  # fmt: skip
    """Stores the (BM, W) bias tile of rows r0.. and columns c0.. (queries and keys, or
    with KEY_ROWS keys and queries) at tile[0, BM*W) in the order of ``_bias_tile``:
    memory index m holds row 16*rA + 8*rB + rC, column 8*cA + 2*cB + cC, where
    m = ((((cA*(BM/16) + rA)*8 + rC)*4 + cB)*2 + rB)*2 + cC."""
    m = tl.arange(0, BM * W)
    row = m // 128 % (BM // 16) * 16 + m // 2 % 2 * 8 + m // 16 % 8
    col = m // (8 * BM) * 8 + m // 4 % 4 * 2 + m % 2
    if KEY_ROWS:
        qi, kj = c0 + col, r0 + row
    else:
        qi, kj = r0 + row, c0 + col
    dr = tl.abs(qi // CQ * S - kj // C)
    dc = tl.abs(qi % CQ * S - kj % C)
    t = tl.load(T + h * stride_th + (dr * C + dc) * stride_tn, mask=(qi < NQ) & (kj < NK), other=0.0)
    tl.store(tile + m, tl.where(kj < NK, t.to(tl.float32) * mult, float("-inf")))


@triton.jit
def _bias_tile(tile, BM: tl.constexpr, W: tl.constexpr):
    """The (BM, W) bias tile ``_tile_bias_store`` wrote: BM*W floats read in memory order
    (coalesced, 16-byte vectors), then permuted back in registers. For a 64-row tile on
    4 warps the coalesced load puts every value in the thread and register where the
    wgmma / mma.sync accumulator holds it: the layout conversion is free (loaded in row
    order it went through shared memory, ~80 instructions per tile). Loaded as one
    flat range: a 2-d pointer tile shares its offsets with V's loads, and Triton gives
    them V's layout (8 elements a thread), which the permutation does not match."""
    x = tl.load(tile + tl.arange(0, BM * W))  # memory order
    x = tl.reshape(x, [W // 8, BM // 16, 8, 4, 2, 2])  # (cA, rA, rC, cB, rB, cC)
    x = tl.permute(x, [1, 4, 2, 0, 3, 5])  # (rA, rB, rC, cA, cB, cC)
    return tl.reshape(x, [BM, W])


@triton.jit
def _tile_bias_chunk(T, BIAS, f0, stride_th, stride_tn, mult, H, NQ, NK, CQ, C, S, BM: tl.constexpr,
                     NCOLS: tl.constexpr, NUM_RB: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """Floats f0 .. f0 + CHUNK - 1 of the dK/dV kernel's bias tiles (what
    ``_tile_bias_kernel`` with KEY_ROWS writes: (H, NUM_RB key blocks, BM * NCOLS)),
    as the dQ kernel writes them in the same backward. A key block's tiles, one after
    another, are one (BM, NCOLS) tile in ``_bias_tile``'s order (their widths are
    multiples of 8), so the flat index gives the key and query directly."""
    f = f0 + tl.arange(0, CHUNK)
    f_ok = f < H * (NUM_RB * BM * NCOLS)
    hr = f // (BM * NCOLS)  # h * NUM_RB + key block
    m = f % (BM * NCOLS)
    kj = hr % NUM_RB * BM + m // 128 % (BM // 16) * 16 + m // 2 % 2 * 8 + m // 16 % 8
    qi = m // (8 * BM) * 8 + m // 4 % 4 * 2 + m % 2
    dr = tl.abs(qi // CQ * S - kj // C)
    dc = tl.abs(qi % CQ * S - kj % C)
    t = tl.load(T + hr // NUM_RB * stride_th + (dr * C + dc) * stride_tn, mask=f_ok & (qi < NQ) & (kj < NK),
                other=0.0)  # fmt: skip
    tl.store(BIAS + f, tl.where(kj < NK, t.to(tl.float32) * mult, float("-inf")), mask=f_ok)


@triton.jit
def _table_bias(T, stride_th, stride_tn, h, qi, kj, NQ, NK, CQ, C, S, bias_scale):
    """The bias of queries qi and keys kj (index tensors that broadcast to the tile)
    gathered from the table, float32 in log2 units: -inf at keys kj >= NK, 0 at
    queries qi >= NQ (finite; their outputs are not stored)."""
    dr = tl.abs(qi // CQ * S - kj // C)
    dc = tl.abs(qi % CQ * S - kj % C)
    t = tl.load(T + h * stride_th + (dr * C + dc) * stride_tn, mask=(qi < NQ) & (kj < NK), other=0.0)
    return tl.where(kj < NK, t.to(tl.float32) * bias_scale, float("-inf"))


@triton.jit
def _fwd_step(q, kt, v, bias, m_i, l_i, acc, qk_scale, FIRST: tl.constexpr, LAST: tl.constexpr,
              BIAS_ACC: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """One key block of the online softmax: (m_i, l_i, acc) updated with the keys of kt
    (BLOCK_DK, n), v (n, BLOCK_DV) and their bias (BLOCK_M, n) divided by c = scale *
    log2(e) > 0 (qk_scale: c per row, (BLOCK_M,), every element equal), so the dot's
    accumulator starts at it: s = q.k + bias / c, and a
    probability is 2^(c * s - c * m), one fma and an exp2. m_i is the running max of s
    (c > 0: that of the logits), l_i the sum of probabilities. FIRST: the first block
    (m_i, l_i, acc are not read: nothing to rescale). LAST: the last block, whose
    probabilities and the rescale of acc take the division by the row's sum (acc comes
    back normalised: a multiplication per probability of this block, not per element
    of acc). Without BIAS_ACC (mma.sync,
    sm_80: the bias in the accumulator's registers took up to 255 registers where 192
    do without) the bias is added after the dot, an fma by 1 (Triton folds a plain add
    into the accumulator)."""
    if BIAS_ACC:
        s = tl.dot(q, kt, bias, input_precision=PREC)
    else:
        s = tl.fma(tl.dot(q, kt, input_precision=PREC), 1.0, bias)
    m_new = tl.max(s, 1) if FIRST else tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(tl.fma(s, qk_scale[:, None], -(m_new * qk_scale)[:, None]))
    if FIRST:
        l_i = tl.sum(p, 1)
        if LAST:
            p = p * (1.0 / l_i)[:, None]
        acc = tl.dot(p.to(v.dtype), v, input_precision=PREC)
    else:
        alpha = tl.exp2((m_i - m_new) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        if LAST:
            inv = 1.0 / l_i
            p = p * inv[:, None]
            alpha = alpha * inv
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_gather_bias(T, stride_th, stride_tn, h, offs_m, offs_n, NQ: tl.constexpr, NK: tl.constexpr,
                     CQ: tl.constexpr, C: tl.constexpr, S: tl.constexpr, bias_mult):  # fmt: skip
    """The bias of queries offs_m and keys offs_n (BLOCK_M,), (n,) gathered from the
    table times bias_mult, float32 (BLOCK_M, n): -inf at keys >= NK; queries >= NQ take
    query NQ - 1's (finite; their outputs are not stored). The indices are clamped, not
    masked, and the grid sizes constexprs (no division by a runtime value)."""
    qi = tl.minimum(offs_m, NQ - 1)
    kj = tl.minimum(offs_n, NK - 1)
    key_inf = tl.where(offs_n < NK, 0.0, float("-inf"))  # (n,)
    dr = tl.abs((qi // CQ * S)[:, None] - (kj // C)[None, :])
    dc = tl.abs((qi % CQ * S)[:, None] - (kj % C)[None, :])
    t = tl.load(T + h * stride_th + (dr * C + dc) * stride_tn)
    return t.to(tl.float32) * bias_mult + key_inf[None, :]


@triton.jit
def _fwd_kernel(
    Q, K, V, BIAS, T, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_th, stride_tn,
    qk_scale, bias_mult,  # c = scale * log2(e) > 0; the gathered bias's multiplier (bias_scale / scale)
    H: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, NK_FULL: tl.constexpr, CQ: tl.constexpr, C: tl.constexpr,
    S: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, GATHER: tl.constexpr, BIAS_ACC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Keys [0, NK_FULL) (a multiple of BLOCK_N) in unmasked blocks of BLOCK_N, then the
    rest, if any, in one masked block of TAIL_N >= NK - NK_FULL keys. Every bias is
    divided by c (``_fwd_step``). GATHER (NK <= BLOCK_N: no full block, every key in
    the tail): the bias tile is gathered from the table T once per program, for the
    GROUP batch entries the program takes one after the other, and BIAS is not read;
    else (GROUP 1) BIAS is the expanded bias in the forward's tiles (``_tile_bias_kernel``)."""
    # the grid's sizes are constexprs: the program id splits by multiplications, not
    # by integer divisions by runtime values
    NUM_QB: tl.constexpr = (NQ + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    pid_m = pid % NUM_QB
    rest = pid // NUM_QB
    h = rest % H
    b0 = rest // H * GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < NQ
    dk_ok = offs_dk < DK
    dv_ok = offs_dv < DV
    # c per row, in a vector register: as a scalar ptxas reloads it into a uniform
    # register before every one of the 32 fmas a thread runs per key block (a ULDC
    # each); x * 0.0 is not folded away (under IEEE rules it is NaN for x = inf or
    # NaN), and here it is 0: the value is c
    qk_row = qk_scale + offs_m.to(tl.float32) * 0.0
    # this query block's bias tiles (``_tile_bias_kernel``): padded, no mask
    b_base = BIAS + (h * NUM_QB + pid_m).to(tl.int64) * (BLOCK_M * (NK_FULL + TAIL_N))
    if TAIL_N > 0:
        offs_t = NK_FULL + tl.arange(0, TAIL_N)
        t_ok = offs_t < NK
    if GATHER:
        tail_bias = _fwd_gather_bias(T, stride_th, stride_tn, h, offs_m, offs_t, NQ, NK, CQ, C, S, bias_mult)
    for g in range(GROUP):
        b = (b0 + g).to(tl.int64)
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_dk[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=m_ok[:, None] & dk_ok[None, :], other=0.0)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_dk[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        b_ptrs = b_base
        if NK_FULL > 0:  # every key of the full blocks exists: no key mask
            # the first block: nothing to rescale
            kt = tl.load(k_ptrs, mask=dk_ok[:, None], other=0.0)  # (BLOCK_DK, BLOCK_N)
            v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_DV)
            bias = _bias_tile(b_ptrs, BLOCK_M, BLOCK_N)
            m_i, l_i, acc = _fwd_step(q, kt, v, bias, m_i, l_i, acc, qk_row, True, False, BIAS_ACC, PREC)
            for _start_n in range(BLOCK_N, NK_FULL, BLOCK_N):
                k_ptrs += BLOCK_N * stride_kn
                v_ptrs += BLOCK_N * stride_vn
                b_ptrs += BLOCK_M * BLOCK_N
                kt = tl.load(k_ptrs, mask=dk_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)
                bias = _bias_tile(b_ptrs, BLOCK_M, BLOCK_N)
                m_i, l_i, acc = _fwd_step(q, kt, v, bias, m_i, l_i, acc, qk_row, False, False, BIAS_ACC, PREC)
        if TAIL_N > 0:
            # the last keys: masked on the loads only (a missing key's bias is -inf)
            kt = tl.load(
                k_base + offs_t[None, :] * stride_kn + offs_dk[:, None] * stride_kd,
                mask=t_ok[None, :] & dk_ok[:, None],
                other=0.0,
            )  # (BLOCK_DK, TAIL_N)
            v = tl.load(
                v_base + offs_t[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=t_ok[:, None] & dv_ok[None, :],
                other=0.0,
            )  # (TAIL_N, BLOCK_DV)
            if not GATHER:
                tail_bias = _bias_tile(b_base + NK_FULL * BLOCK_M, BLOCK_M, TAIL_N)
            m_i, l_i, acc = _fwd_step(q, kt, v, tail_bias, m_i, l_i, acc, qk_row, NK_FULL == 0, True,
                                     BIAS_ACC, PREC)  # fmt: skip
        else:  # normalised here: a division per row, not per element
            acc = acc * (1.0 / l_i)[:, None]
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
        lse = (m_i * qk_scale + tl.log2(l_i)) * 0.6931471805599453  # natural log
        tl.store(LSE + (b * H + h) * NQ + offs_m, lse, mask=m_ok)


@triton.jit
def _dkdv_step(
    k, v, dk, dv, bias_t, q_base, g_base, o_base, lse_base, delta_base, offs_m, offs_dk, offs_dv,
    stride_qn, stride_qd, stride_gn, stride_gd, stride_on, stride_od, NQ, qk_scale,
    DK: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, DELTA_FROM_O: tl.constexpr, BIAS_ACC: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """dK, dV of a key block updated with the queries offs_m (all of them below NQ unless
    MASKED), bias_t their (keys, queries) bias tile: with BIAS_ACC divided by c = qk_scale
    > 0 and the K Q^T dot's accumulator (a logit in log2 units is then one fma, c * s -
    lse * log2(e), as in the forward), else in log2 units, added after the dot. A missing
    key's bias is -inf (p = 0); a missing query has q = dO = 0 and delta = 0, so its p = 1
    contributes dO = 0 to dv and dS = 0 to dk."""
    if MASKED:
        m_ok = offs_m < NQ
        q_mask = m_ok[None, :] & (offs_dk[:, None] < DK)
        g_mask = m_ok[:, None] & (offs_dv[None, :] < DV)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
    else:
        q_mask = offs_dk[:, None] < DK
        g_mask = offs_dv[None, :] < DV
        lse = tl.load(lse_base + offs_m)
    qt = tl.load(q_base + offs_m[None, :] * stride_qn + offs_dk[:, None] * stride_qd, mask=q_mask, other=0.0)
    if BIAS_ACC:
        st = tl.dot(k, qt, bias_t, input_precision=PREC)  # (BLOCK_N, BLOCK_M), log2 units / c
        pt = tl.exp2(tl.fma(st, qk_scale, -(lse * 1.4426950408889634)[None, :]))
    else:
        st = tl.dot(k, qt, input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        pt = tl.exp2(st + bias_t - lse[None, :] * 1.4426950408889634)
    do = tl.load(g_base + offs_m[:, None] * stride_gn + offs_dv[None, :] * stride_gd, mask=g_mask, other=0.0)
    if DELTA_FROM_O:
        o = tl.load(o_base + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od, mask=g_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # rowsum(dO * O)
    elif MASKED:
        delta = tl.load(delta_base + offs_m, mask=offs_m < NQ, other=0.0)
    else:
        delta = tl.load(delta_base + offs_m)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)  # do: (BLOCK_M, BLOCK_DV)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)  # (BLOCK_N, BLOCK_M)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, BIAS, T, DO, O, LSE, DELTA, DK_, DV_, PART, DT_,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_th, stride_tn,
    H, NQ, NQ_FULL, NK, NUM_KB, CQ, C, S,
    qk_scale, sm_scale, bias_mult,  # scale * log2(e); scale; the bias's multiplier (``_dkdv_step``)
    NUM_PROGRAMS, FOLD_P, FOLD_OFF, FOLD_NEG,  # the table gradient's fold (``_fold_entry``)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FULL: tl.constexpr, TAIL_M: tl.constexpr,
    LOOP_MASKED: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, GATHER: tl.constexpr, DELTA_FROM_O: tl.constexpr,
    BIAS_ACC: tl.constexpr, FOLD_R: tl.constexpr, FOLD_C: tl.constexpr,
    FOLD_E: tl.constexpr, FOLD_PCH: tl.constexpr, FOLD_ONE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Queries [0, NQ_FULL) (a multiple of BLOCK_M; FULL: NQ_FULL > 0) in unmasked blocks
    of BLOCK_M, then the rest, if any, in one masked block of TAIL_M >= NQ - NQ_FULL
    (LOOP_MASKED: NQ_FULL covers every query, the loop's blocks masked, no tail);
    delta = rowsum(dO * O) as the dQ kernel wrote it (DELTA_FROM_O: computed here from O;
    the key-blocked dQ kernel writes none). GATHER (NQ <= BLOCK_M: every query
    in the tail): the bias tile is gathered from the table T and BIAS is not read; else
    BIAS is the expanded bias in this kernel's tiles (``_tile_bias_kernel``: per key
    block its query tiles, [0, NQ_FULL) then the tail). Then each program folds every
    NUM_PROGRAMS-th entry of the table gradient, from its own on, out of the dQ kernel's
    partials PART into DT_ (the dQ kernel ran before this launch), so the backward has
    no fold launch."""
    pid = tl.program_id(0)
    pid_n = pid % NUM_KB
    pid_bh = pid // NUM_KB
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < NK
    dk_ok = offs_dk < DK
    dv_ok = offs_dv < DV
    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
        mask=n_ok[:, None] & dk_ok[None, :],
        other=0.0,
    )  # (BLOCK_N, BLOCK_DK)
    v = tl.load(
        V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
        mask=n_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )  # (BLOCK_N, BLOCK_DV)

    q_base = Q + b * stride_qb + h * stride_qh
    g_base = DO + b * stride_gb + h * stride_gh
    o_base = O + b * stride_ob + h * stride_oh
    # this key block's bias tiles (keys x queries): padded, no mask
    b_base = BIAS + (h * NUM_KB + pid_n).to(tl.int64) * (BLOCK_N * (NQ_FULL + TAIL_M))
    lse_base = LSE + pid_bh.to(tl.int64) * NQ
    delta_base = DELTA + pid_bh.to(tl.int64) * NQ
    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # no full block (GATHER): no loop code (BIAS is the table there, not float32 tiles)
    if FULL:
        for start_m in range(0, NQ_FULL, BLOCK_M):  # unless LOOP_MASKED: every query exists
            offs_m = start_m + tl.arange(0, BLOCK_M)
            bias_t = _bias_tile(b_base + start_m * BLOCK_N, BLOCK_N, BLOCK_M)
            dk, dv = _dkdv_step(k, v, dk, dv, bias_t, q_base, g_base, o_base, lse_base, delta_base, offs_m, offs_dk,
                                offs_dv, stride_qn, stride_qd, stride_gn, stride_gd, stride_on, stride_od, NQ,
                                qk_scale, DK, DV, LOOP_MASKED, DELTA_FROM_O, BIAS_ACC, PREC)  # fmt: skip
    if TAIL_M > 0:
        offs_t = NQ_FULL + tl.arange(0, TAIL_M)
        if GATHER:
            bias_t = _table_bias(T, stride_th, stride_tn, h, offs_t[None, :], offs_n[:, None], NQ, NK, CQ, C, S,
                                 bias_mult)  # fmt: skip
        else:
            bias_t = _bias_tile(b_base + NQ_FULL * BLOCK_N, BLOCK_N, TAIL_M)
        dk, dv = _dkdv_step(k, v, dk, dv, bias_t, q_base, g_base, o_base, lse_base, delta_base, offs_t, offs_dk,
                            offs_dv, stride_qn, stride_qd, stride_gn, stride_gd, stride_on, stride_od, NQ, qk_scale,
                            DK, DV, True, DELTA_FROM_O, BIAS_ACC, PREC)  # fmt: skip

    dk = dk * sm_scale
    out_row = pid_bh.to(tl.int64) * NK + offs_n
    tl.store(
        DK_ + out_row[:, None] * DK + offs_dk[None, :],
        dk.to(DK_.dtype.element_ty),
        mask=n_ok[:, None] & dk_ok[None, :],
    )
    tl.store(
        DV_ + out_row[:, None] * DV + offs_dv[None, :],
        dv.to(DV_.dtype.element_ty),
        mask=n_ok[:, None] & dv_ok[None, :],
    )
    for o in range(pid, H * (FOLD_R * FOLD_C), NUM_PROGRAMS):  # the table gradient's entries
        _fold_entry(PART, DT_, o, FOLD_P, H, FOLD_OFF, FOLD_NEG, FOLD_R, FOLD_C, FOLD_E, FOLD_PCH, FOLD_ONE)


@triton.jit
def _dq_program(H, RQ, CQ, NUM_QB, QR: tl.constexpr, CQP: tl.constexpr):
    """What a dQ/table program (either kernel) works on: its query block pid_q (query-grid
    rows [pid_q*QR, pid_q*QR + QR), CQP column slots each), head h, batch group g, and
    per query slot its grid row and column, whether it exists and its token."""
    pid = tl.program_id(0)
    pid_q = pid % NUM_QB
    rest = pid // NUM_QB
    offs_m = tl.arange(0, QR * CQP)
    qg_row = pid_q * QR + offs_m // CQP
    qg_col = offs_m % CQP
    m_ok = (qg_row < RQ) & (qg_col < CQ)
    return pid_q, rest % H, rest // H, qg_row, qg_col, m_ok, qg_row * CQ + qg_col


@triton.jit
def _query_block(
    Q, DO, O, LSE, DELTA, b64, h, bh, q_tok, m_ok, offs_dk, offs_dv,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_gb, stride_gh, stride_gn, stride_gd,
    stride_ob, stride_oh, stride_on, stride_od, NQ, DK, DV, STORE_DELTA: tl.constexpr,
):  # fmt: skip
    """What the all-keys dQ and the fused backward kernels read of a query block (tokens
    q_tok, m_ok where present) of batch entry b64 and head h (bh = b64 * H + h): q^T
    (BLOCK_DK, BM) and dO^T (BLOCK_DV, BM), 0 at missing queries, delta = rowsum(dO * O)
    and the row logsumexp in log2 units (BM,); STORE_DELTA: delta stored at DELTA too
    (for the dK/dV kernel)."""
    qt = tl.load(
        Q + b64 * stride_qb + h * stride_qh + q_tok[None, :] * stride_qn + offs_dk[:, None] * stride_qd,
        mask=m_ok[None, :] & (offs_dk[:, None] < DK),
        other=0.0,
    )
    g_ptrs = DO + b64 * stride_gb + h * stride_gh + q_tok[None, :] * stride_gn + offs_dv[:, None] * stride_gd
    do_t = tl.load(g_ptrs, mask=m_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
    o_ptrs = O + b64 * stride_ob + h * stride_oh + q_tok[None, :] * stride_on + offs_dv[:, None] * stride_od
    ot = tl.load(o_ptrs, mask=m_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
    delta = tl.sum(ot.to(tl.float32) * do_t.to(tl.float32), 0)
    if STORE_DELTA:
        tl.store(DELTA + bh * NQ + q_tok, delta, mask=m_ok)
    lse = tl.load(LSE + bh * NQ + q_tok, mask=m_ok, other=0.0) * 1.4426950408889634
    return qt, do_t, delta, lse


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, T, DO, O, LSE, DQ_, DT_, DELTA, DK_, DV_, TILES_,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_th, stride_tn,
    B, H, NQ, R, C, RQ, CQ, S, NUM_QB, BATCH_GROUP,
    qk_scale, sm_scale, bias_scale, table_scale,  # qk_scale, bias_scale multiplied by log2(e)
    tiles_mult,  # the dK/dV kernel's bias multiplier (``_launch_dkdv``)
    QR: tl.constexpr, CQP: tl.constexpr, TRP: tl.constexpr, CP: tl.constexpr, E: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, STORE_DELTA: tl.constexpr, DKDV: tl.constexpr,
    TILES: tl.constexpr, TILE_BM: tl.constexpr, TILE_NCOLS: tl.constexpr, TILE_RB: tl.constexpr,
    TILE_CHUNK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dQ and the table partial of a query block against every key. DKDV (the block
    holds every query: small grids): dK and dV too, from the same P and dS tiles, so
    the backward has no dK/dV launch. TILES: each program first writes its chunk of
    TILE_CHUNK floats of the dK/dV kernel's bias tiles (``_tile_bias_chunk``; from the
    table of this call), so the backward has no bias launch."""
    if TILES:  # first: nothing else is live yet
        _tile_bias_chunk(T, TILES_, tl.program_id(0) * TILE_CHUNK, stride_th, stride_tn, tiles_mult, H, NQ, R * C,
                         CQ, C, S, TILE_BM, TILE_NCOLS, TILE_RB, TILE_CHUNK)  # fmt: skip
    pid_q, h, g, qg_row, qg_col, m_ok, q_tok = _dq_program(H, RQ, CQ, NUM_QB, QR, CQP)
    # every key: TRP key-grid rows of CP column slots
    offs_n = tl.arange(0, TRP * CP)
    k_row = offs_n // CP
    k_col = offs_n % CP
    n_ok = (k_row < R) & (k_col < C)
    k_tok = k_row * C + k_col
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)

    # keys are the tiles' rows (all TRP*CP of them, the dots' M), queries their
    # columns: a warp then owns key rows, never a copy of another warp's query rows
    # the bias tile, the same for every batch entry: gathered from the table once, in
    # log2 units; -inf at missing keys, 0 at missing queries (their dS is 0)
    dr = tl.abs(k_row[:, None] - (qg_row * S)[None, :])
    dc = tl.abs(k_col[:, None] - (qg_col * S)[None, :])
    t = tl.load(T + h * stride_th + (dr * C + dc) * stride_tn, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
    bias_t = tl.where(n_ok[:, None], t.to(tl.float32) * bias_scale, float("-inf"))  # (BN, BM)
    dst_sum = tl.zeros([TRP * CP, QR * CQP], dtype=tl.float32)  # dS^T summed over the batch group

    b_start = g * BATCH_GROUP
    b_end = tl.minimum(b_start + BATCH_GROUP, B)
    for b in range(b_start, b_end):
        b64 = tl.cast(b, tl.int64)
        bh = b64 * H + h
        qt, do_t, delta, lse = _query_block(
            Q, DO, O, LSE, DELTA, b64, h, bh, q_tok, m_ok, offs_dk, offs_dv,
            stride_qb, stride_qh, stride_qn, stride_qd, stride_gb, stride_gh, stride_gn, stride_gd,
            stride_ob, stride_oh, stride_on, stride_od, NQ, DK, DV, STORE_DELTA,
        )  # fmt: skip
        k_base = K + b64 * stride_kb + h * stride_kh
        k = tl.load(
            k_base + k_tok[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
            mask=n_ok[:, None] & (offs_dk[None, :] < DK),
            other=0.0,
        )  # (BN, BLOCK_DK)
        st = tl.dot(k, qt, input_precision=PREC) * qk_scale  # (BN, BM)
        # a missing key's bias is -inf (p = 0); a missing query has q = dO = O = 0,
        # so its p = 1 gives dS = 0
        pt = tl.exp2(st + bias_t - lse[None, :])
        v = tl.load(
            V + b64 * stride_vb + h * stride_vh + k_tok[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=n_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )  # (BN, BLOCK_DV)
        dpt = tl.dot(v, do_t, input_precision=PREC)
        dst = pt * (dpt - delta[None, :])  # (BN, BM) = (TRP*CP, QR*CQP), natural units
        dst_sum += dst
        kt = tl.load(  # again, transposed: cheaper in registers than tl.trans(k)
            k_base + k_tok[None, :] * stride_kn + offs_dk[:, None] * stride_kd,
            mask=n_ok[None, :] & (offs_dk[:, None] < DK),
            other=0.0,
        )  # (BLOCK_DK, BN)
        dqt = tl.dot(kt, dst.to(kt.dtype), input_precision=PREC)  # (BLOCK_DK, BM)
        tl.store(
            DQ_ + (bh * NQ + q_tok)[None, :] * DK + offs_dk[:, None],
            (dqt * sm_scale).to(DQ_.dtype.element_ty),
            mask=m_ok[None, :] & (offs_dk[:, None] < DK),
        )
        if DKDV:  # every query is in this block: its sums over queries are whole
            # a missing query's p = 1 meets dO = 0 (dV) and q = 0 (dK): no term
            dv = tl.dot(pt.to(do_t.dtype), tl.trans(do_t), input_precision=PREC)  # (BN, BLOCK_DV)
            out_row = bh * (R * C) + k_tok  # every key of the grid
            tl.store(
                DV_ + out_row[:, None] * DV + offs_dv[None, :],
                dv.to(DV_.dtype.element_ty),
                mask=n_ok[:, None] & (offs_dv[None, :] < DV),
            )
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PREC)  # (BN, BLOCK_DK)
            tl.store(
                DK_ + out_row[:, None] * DK + offs_dk[None, :],
                (dk * sm_scale).to(DK_.dtype.element_ty),
                mask=n_ok[:, None] & (offs_dk[None, :] < DK),
            )

    # table gradient of the group, once: element (qr, kr, qc, e) of the skew gather
    # reads dS at query slot (qr, qc) and key slot (kr, qc*S + e - OFF), i.e. at the
    # signed column offset dc = e - OFF (zero where that slot does not exist); summed
    # over qc, then each (query row, key row) block is added into its |dr| row
    OFF = (CQP - 1) * S
    g4 = tl.arange(0, QR * TRP * CQP * E)
    g_e = g4 % E
    g_qc = (g4 // E) % CQP
    g_kc = g_e - OFF + g_qc * S
    g_ok = (g_kc >= 0) & (g_kc < CP)
    g_idx = ((g4 // (E * CQP)) % TRP * CP + g_kc) * (QR * CQP) + g4 // (E * CQP * TRP) * CQP + g_qc
    x = tl.gather(tl.reshape(dst_sum, [TRP * CP * QR * CQP]), tl.where(g_ok, g_idx, 0), 0)
    x = tl.sum(tl.reshape(tl.where(g_ok, x, 0.0), [QR * TRP, CQP, E]), 1)  # (QR*TRP, E)
    # (a select, not a product with a one-hot matrix: Triton rewrites a sum of
    # a[:, :, None] * b[None, :, :] over axis 1 into a tensor-core dot of its own,
    # TF32 with triton 3.6, and doubled where the summed axis is short)
    pr = tl.arange(0, QR * TRP)
    pr_d = tl.abs((pid_q * QR + pr // TRP) * S - pr % TRP)  # |dr| of each row of x
    trs = tl.arange(0, TRP)
    hit = trs[:, None, None] == pr_d[None, :, None]  # (TRP, QR*TRP, 1)
    u = tl.sum(tl.where(hit, x[None, :, :], 0.0), 1)  # (TRP, E)
    es = tl.arange(0, E)
    part_row = (g * NUM_QB + pid_q).to(tl.int64) * H + h
    tl.store(
        DT_ + (part_row * R + trs[:, None]) * E + es[None, :],
        u * table_scale,
        mask=(trs[:, None] < R) & (es[None, :] >= 0),
    )


@triton.jit
def _bwd_fused_kernel(
    Q, K, V, BIAS, DO, O, LSE, DQ_, DK_, DV_, DT_,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_ob, stride_oh, stride_on, stride_od,
    B, H, NQ, R, C, RQ, CQ, S, NUM_QB, BATCH_GROUP,
    qk_scale, sm_scale, table_scale,  # qk_scale multiplied by log2(e)
    QR: tl.constexpr, CQP: tl.constexpr, TRP: tl.constexpr, CP: tl.constexpr, E: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, TERM_F16: tl.constexpr, KT_RELOAD: tl.constexpr,
    PREC: tl.constexpr, GATHER_ROWS: tl.constexpr,
):  # fmt: skip
    """The backward of a head and a group of BATCH_GROUP batch entries but the table
    gradient's fold: per batch entry every query block (QR query-grid rows of CQP
    slots, as in ``_bwd_dq_kernel``) against every key (TRP x CP slots, the tiles'
    rows), P recomputed once per (query, key): dQ of the block stored, dK and dV summed
    over the blocks in registers and stored after the last, and dS reduced per block
    into the program's table partial (|dr|, signed dc + OFF), the dQ kernel's layout
    (one partial per program) that ``_fold_kernel`` folds. BIAS: the bias tiles of
    ``_fused_bias_kernel`` divided by c = qk_scale > 0, the K Q^T dot's accumulator
    (a logit in log2 units is then one fma, as in the forward)."""
    pid = tl.program_id(0)
    h = pid % H
    g = pid // H
    offs_n = tl.arange(0, TRP * CP)
    k_row = offs_n // CP
    k_col = offs_n % CP
    n_ok = (k_row < R) & (k_col < C)
    k_tok = k_row * C + k_col
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m = tl.arange(0, QR * CQP)
    # the table gradient: the column offsets' one-hot matrix (key column kc, query column
    # qc) -> e = kc - qc*S + OFF, the signed offset dc = e - OFF
    OFF = (CQP - 1) * S
    oh_r = tl.arange(0, CP * CQP)
    oh_e = tl.arange(0, E)
    one_hot = tl.where(oh_r[:, None] // CQP - oh_r[:, None] % CQP * S + OFF == oh_e[None, :], 1.0, 0.0)
    # dS enters its dot as two bfloat16 terms (float16 under the interpreter, TERM_F16:
    # its bfloat16 dot is wrong)
    TERM: tl.constexpr = tl.float16 if TERM_F16 else tl.bfloat16
    one_hot = one_hot.to(TERM)  # (CP*CQP, E), exact
    u_d = tl.arange(0, TRP * E) // E  # u's rows |dr| and columns e, flat
    u_e = tl.arange(0, TRP * E) % E
    u_acc = tl.zeros([TRP * E], dtype=tl.float32)  # the partial (|dr|, e), flat

    b_start = g * BATCH_GROUP
    b_end = tl.minimum(b_start + BATCH_GROUP, B)
    for fb in range(b_start, b_end):
        b64 = tl.cast(fb, tl.int64)
        bh = b64 * H + h
        k_base = K + b64 * stride_kb + h * stride_kh
        k = tl.load(
            k_base + k_tok[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
            mask=n_ok[:, None] & (offs_dk[None, :] < DK),
            other=0.0,
        )  # (BN, BLOCK_DK)
        v = tl.load(
            V + b64 * stride_vb + h * stride_vh + k_tok[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=n_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )  # (BN, BLOCK_DV)
        dk = tl.zeros([TRP * CP, BLOCK_DK], dtype=tl.float32)
        dv = tl.zeros([TRP * CP, BLOCK_DV], dtype=tl.float32)
        for qb in range(0, NUM_QB):
            qg_row = qb * QR + offs_m // CQP
            qg_col = offs_m % CQP
            m_ok = (qg_row < RQ) & (qg_col < CQ)
            q_tok = qg_row * CQ + qg_col
            qt, do_t, delta, lse = _query_block(
                Q, DO, O, LSE, LSE, b64, h, bh, q_tok, m_ok, offs_dk, offs_dv,
                stride_qb, stride_qh, stride_qn, stride_qd, stride_gb, stride_gh, stride_gn, stride_gd,
                stride_ob, stride_oh, stride_on, stride_od, NQ, DK, DV, False,
            )  # fmt: skip
            # this block's bias tile (``_fused_bias_kernel``), divided by c: -inf at
            # missing keys, 0 at missing queries (their q = dO = O = 0: p = 1 meets
            # dO = 0 and q = 0, dS = 0)
            bias_t = _bias_tile(BIAS + (h * NUM_QB + qb).to(tl.int64) * (TRP * CP * QR * CQP), TRP * CP, QR * CQP)
            st = tl.dot(k, qt, bias_t, input_precision=PREC)  # (BN, BM), log2 units / c
            pt = tl.exp2(tl.fma(st, qk_scale, -lse[None, :]))
            dpt = tl.dot(v, do_t, input_precision=PREC)
            dst = pt * (dpt - delta[None, :])  # (BN, BM), natural units
            dv = tl.dot(pt.to(do_t.dtype), tl.trans(do_t), dv, input_precision=PREC)  # (BN, BLOCK_DV)
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PREC)  # (BN, BLOCK_DK)
            # the dQ^T dot runs on mma.sync, every warp holding all of its K^T operand:
            # with KT_RELOAD K^T is loaded again per block (from L1), not kept (triton
            # 3.6 spilled 84 B keeping it; triton 3.9 40 B reloading it)
            if KT_RELOAD:
                kt = tl.load(
                    K + b64 * stride_kb + h * stride_kh + k_tok[None, :] * stride_kn + offs_dk[:, None] * stride_kd,
                    mask=n_ok[None, :] & (offs_dk[:, None] < DK),
                    other=0.0,
                )  # (BLOCK_DK, BN)
            else:
                kt = tl.trans(k)
            dqt = tl.dot(kt, dst.to(kt.dtype), input_precision=PREC)  # (BLOCK_DK, BM)
            tl.store(
                DQ_ + (bh * NQ + q_tok)[None, :] * DK + offs_dk[:, None],
                (dqt * sm_scale).to(DQ_.dtype.element_ty),
                mask=m_ok[None, :] & (offs_dk[:, None] < DK),
            )
            # table space: per (key row, query row) the block's dS summed by signed
            # column offset, one tensor-core dot with the one-hot matrix (dS split into
            # two bfloat16 terms stacked as rows: 16 bits, the one-hot exact; a
            # skew gather per block cost ~930 instructions a warp, ~4x this), then each
            # row gathered into its |dr| row of the partial
            # (the first term is dS with its low 16 bits cleared: exact in bfloat16, dS -
            # t0 exact in float32, t1 rounded: ~16 bits; kept apart from dS's rounding
            # for the dK and dQ dots, which then converts two values an instruction:
            # sharing it cost an F2F and a PRMT a value, 64 instructions a block)
            t0f = (dst.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
            t0 = t0f.to(TERM)
            t1 = (dst - t0f).to(TERM)
            a2 = tl.permute(tl.reshape(tl.join(t0, t1), [TRP, CP, QR, CQP, 2]), [4, 0, 2, 1, 3])
            y = tl.dot(tl.reshape(a2, [2 * TRP * QR, CP * CQP]), one_hot)  # rows (term, key row, query row)
            y = tl.reshape(y, [2 * TRP * QR * E])
            # the rows j = (sign, term, query row), GATHER_ROWS of them a gather: y goes
            # through shared memory once a gather (all 4 * QR in one: once a block,
            # summed in-thread); kr = q_row + sign * |dr|, g_base the offset of (term,
            # query row) in y (defined here, not before the loops: constants per register)
            for j0 in tl.static_range(0, 4 * QR, GATHER_ROWS):
                g_j = j0 + tl.arange(0, GATHER_ROWS)[:, None]
                g_sign = 1 - g_j // (2 * QR) * 2
                g_qr = g_j % QR
                g_base = g_j // QR % 2 * (TRP * QR * E) + g_qr * E
                g_kr = (qb * QR + g_qr) * S + g_sign * u_d[None, :]  # dr = +-(kr - q_row)
                g_ok = (g_kr >= 0) & (g_kr < TRP) & ((g_sign > 0) | (u_d[None, :] > 0))
                g_idx = tl.where(g_ok, g_base + g_kr * (QR * E) + u_e[None, :], 0)
                yg = tl.reshape(tl.gather(y, tl.reshape(g_idx, [GATHER_ROWS * TRP * E]), 0), [GATHER_ROWS, TRP * E])
                u_acc += tl.sum(tl.where(g_ok, yg, 0.0), 0)
        out_row = bh * (R * C) + k_tok  # every key of the grid
        tl.store(
            DV_ + out_row[:, None] * DV + offs_dv[None, :],
            dv.to(DV_.dtype.element_ty),
            mask=n_ok[:, None] & (offs_dv[None, :] < DV),
        )
        tl.store(
            DK_ + out_row[:, None] * DK + offs_dk[None, :],
            (dk * sm_scale).to(DK_.dtype.element_ty),
            mask=n_ok[:, None] & (offs_dk[None, :] < DK),
        )

    tl.store(DT_ + (g * H + h).to(tl.int64) * (R * E) + tl.arange(0, TRP * E), u_acc * table_scale, mask=u_d < R)


@triton.jit
def _fused_bias_kernel(T, BIAS, stride_th, stride_tn, mult, H, NQ, NK, R, C, RQ, CQ, S, NUM_QB,
                       QR: tl.constexpr, CQP: tl.constexpr, TRP: tl.constexpr, CP: tl.constexpr,
                       CHUNK: tl.constexpr):  # fmt: skip
    """Floats of the fused backward's bias tiles (H, NUM_QB, (TRP*CP) x (QR*CQP)), keys
    (grid slots) the rows and a query block's slots the columns, in ``_bias_tile``'s
    order, mult * table[h, |dr|*C + |dc|] (mult = bias_scale / scale: the bias divided
    by c = scale * log2(e), ``_bwd_fused_kernel``): -inf at missing keys, 0 at missing
    queries. CHUNK floats a program."""
    BN: tl.constexpr = TRP * CP
    BM: tl.constexpr = QR * CQP
    f = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    f_ok = f < H * NUM_QB * (BN * BM)
    hq = (f // (BN * BM)).to(tl.int32)  # h * NUM_QB + query block
    m = (f % (BN * BM)).to(tl.int32)
    row = m // 128 % (BN // 16) * 16 + m // 2 % 2 * 8 + m // 16 % 8
    col = m // (8 * BN) * 8 + m // 4 % 4 * 2 + m % 2
    kr, kc = row // CP, row % CP
    qr, qc = hq % NUM_QB * QR + col // CQP, col % CQP
    k_ok = (kr < R) & (kc < C)
    dr = tl.abs(kr - qr * S)
    dc = tl.abs(kc - qc * S)
    t = tl.load(T + hq // NUM_QB * stride_th + (dr * C + dc) * stride_tn, mask=f_ok & k_ok & (qr < RQ) & (qc < CQ),
                other=0.0)  # fmt: skip
    tl.store(BIAS + f, tl.where(k_ok, t.to(tl.float32) * mult, float("-inf")), mask=f_ok)


@triton.jit
def _bwd_dq_blocked_kernel(
    Q, K, V, T, DO, O, LSE, DQ_, DT_,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_th, stride_tn,
    B, H, NQ, R, C, RQ, CQ, S, NUM_QB, BATCH_GROUP,
    qk_scale, sm_scale, bias_scale, table_scale,  # qk_scale, bias_scale multiplied by log2(e)
    QR: tl.constexpr, CQP: tl.constexpr, KR: tl.constexpr, CP: tl.constexpr,
    TRP: tl.constexpr, E: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_q, h, g, qg_row, qg_col, m_ok, q_tok = _dq_program(H, RQ, CQ, NUM_QB, QR, CQP)
    # key block kb: key-grid rows [kb*KR, kb*KR + KR), CP column slots each
    offs_n = tl.arange(0, KR * CP)
    k_rl = offs_n // CP
    k_col = offs_n % CP
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)

    # table gradient, first in (|dr|, signed dc) space: element (qr, kr, qc, e) of the
    # skew gather reads ds at query slot (qr, qc) and key slot (kr, qc*S + e - OFF),
    # i.e. at the signed column offset dc = e - OFF (zero where that slot does not exist)
    OFF = (CQP - 1) * S
    g4 = tl.arange(0, QR * KR * CQP * E)
    g_e = g4 % E
    g_qc = (g4 // E) % CQP
    g_kc = g_e - OFF + g_qc * S
    g_ok = (g_kc >= 0) & (g_kc < CP)
    g_idx = (g4 // (E * CQP * KR) * CQP + g_qc) * (KR * CP) + (g4 // (E * CQP)) % KR * CP + g_kc
    g_idx = tl.where(g_ok, g_idx, 0)
    # the (query row, key row) pair of each row of the gathered view
    pr = tl.arange(0, QR * KR)
    pr_q = (pid_q * QR + pr // KR) * S
    pr_k = pr % KR
    trs = tl.arange(0, TRP)
    u_acc = tl.zeros([TRP, E], dtype=tl.float32)  # sum of ds per (|dr|, e)

    b_start = g * BATCH_GROUP
    b_end = tl.minimum(b_start + BATCH_GROUP, B)
    for b in range(b_start, b_end):
        b64 = tl.cast(b, tl.int64)
        bh = b64 * H + h
        q = tl.load(
            Q + b64 * stride_qb + h * stride_qh + q_tok[:, None] * stride_qn + offs_dk[None, :] * stride_qd,
            mask=m_ok[:, None] & (offs_dk[None, :] < DK),
            other=0.0,
        )  # (BM, BLOCK_DK)
        do = tl.load(
            DO + b64 * stride_gb + h * stride_gh + q_tok[:, None] * stride_gn + offs_dv[None, :] * stride_gd,
            mask=m_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )  # (BM, BLOCK_DV)
        o = tl.load(
            O + b64 * stride_ob + h * stride_oh + q_tok[:, None] * stride_on + offs_dv[None, :] * stride_od,
            mask=m_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # rowsum(dO * O)
        lse = tl.load(LSE + bh * NQ + q_tok, mask=m_ok, other=0.0) * 1.4426950408889634
        k_base = K + b64 * stride_kb + h * stride_kh
        v_base = V + b64 * stride_vb + h * stride_vh
        dq = tl.zeros([QR * CQP, BLOCK_DK], dtype=tl.float32)
        for kb in range(0, tl.cdiv(R, KR)):
            kg_row = kb * KR + k_rl
            n_ok = (kg_row < R) & (k_col < C)
            k_tok = kg_row * C + k_col
            kt = tl.load(
                k_base + k_tok[None, :] * stride_kn + offs_dk[:, None] * stride_kd,
                mask=n_ok[None, :] & (offs_dk[:, None] < DK),
                other=0.0,
            )  # (BLOCK_DK, BN)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            # a missing key's bias is -inf (p = 0); a missing query has q = dO = O = 0,
            # so its p = 1 gives dS = 0
            dr = tl.abs((qg_row * S)[:, None] - kg_row[None, :])
            dc = tl.abs((qg_col * S)[:, None] - k_col[None, :])
            t = tl.load(T + h * stride_th + (dr * C + dc) * stride_tn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            p = tl.exp2(s + tl.where(n_ok[None, :], t.to(tl.float32) * bias_scale, float("-inf")) - lse[:, None])
            vt = tl.load(
                v_base + k_tok[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                mask=n_ok[None, :] & (offs_dv[:, None] < DV),
                other=0.0,
            )  # (BLOCK_DV, BN)
            dp = tl.dot(do, vt, input_precision=PREC)
            ds = p * (dp - delta[:, None])  # (BM, BN) = (QR*CQP, KR*CP), natural units
            k = tl.load(  # again, row-major: cheaper in registers than tl.trans(kt)
                k_base + k_tok[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
                mask=n_ok[:, None] & (offs_dk[None, :] < DK),
                other=0.0,
            )  # (BN, BLOCK_DK)
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
            # table space: sum each (query row, key row) block of ds along its column
            # offsets, then add the blocks into their |dr| rows
            x = tl.gather(tl.reshape(ds, [QR * CQP * KR * CP]), g_idx, 0)
            x = tl.sum(tl.reshape(tl.where(g_ok, x, 0.0), [QR * KR, CQP, E]), 1)  # (QR*KR, E)
            # (a select, not a product with a one-hot matrix: Triton rewrites a sum of
            # a[:, :, None] * b[None, :, :] over axis 1 into a tensor-core dot of its
            # own, TF32 with triton 3.6, and doubled where QR*KR < 8)
            pr_d = tl.abs(pr_q - (kb * KR + pr_k))
            hit = trs[:, None, None] == pr_d[None, :, None]  # (TRP, QR*KR, 1)
            u_acc += tl.sum(tl.where(hit, x[None, :, :], 0.0), 1)
        tl.store(
            DQ_ + (bh * NQ + q_tok)[:, None] * DK + offs_dk[None, :],
            (dq * sm_scale).to(DQ_.dtype.element_ty),
            mask=m_ok[:, None] & (offs_dk[None, :] < DK),
        )

    es = tl.arange(0, E)
    part_row = (g * NUM_QB + pid_q).to(tl.int64) * H + h
    tl.store(
        DT_ + (part_row * R + trs[:, None]) * E + es[None, :],
        u_acc * table_scale,
        mask=(trs[:, None] < R) & (es[None, :] >= 0),
    )


@triton.jit
def _fold_entry(PART, DT, o, P, H, OFF, NEG, R: tl.constexpr, C: tl.constexpr, E: tl.constexpr,
                PCH: tl.constexpr, ONE_CHUNK: tl.constexpr):  # fmt: skip
    """dtable's flat entry o = h*R*C + r*C + c: the sum over the P partials of the signed
    offsets dc = c and dc = -c (0 < c <= NEG) of row (h, r); partial (P, H, R, E) holds
    dc at column OFF + dc. PCH partials at a time (ONE_CHUNK: P <= PCH, no loop), summed
    over them at the end: a fixed order for a fixed config (deterministic, no atomics)."""
    c = o % C
    row = PART + ((o // C) * E + OFF).to(tl.int64)  # partial 0's row (h, r), at dc = 0
    p_neg = tl.where((c >= 1) & (c <= NEG), P, 0)  # the partials whose dc = -c is read
    ps = tl.arange(0, PCH)
    if ONE_CHUNK:
        rows = row + ps.to(tl.int64) * (H * R * E)
        acc = tl.load(rows + c, mask=ps < P, other=0.0) + tl.load(rows - c, mask=ps < p_neg, other=0.0)
    else:
        acc = tl.zeros([PCH], dtype=tl.float32)
        for p0 in range(0, P, PCH):
            rows = row + (p0 + ps).to(tl.int64) * (H * R * E)
            acc += tl.load(rows + c, mask=(p0 + ps) < P, other=0.0)
            acc += tl.load(rows - c, mask=(p0 + ps) < p_neg, other=0.0)
    tl.store(DT + o, tl.sum(acc, 0).to(DT.dtype.element_ty))


@triton.jit
def _fold_kernel(PART, DT, P, H, OFF, NEG, R: tl.constexpr, C: tl.constexpr, E: tl.constexpr, PCH: tl.constexpr,
                 ONE_CHUNK: tl.constexpr):  # fmt: skip
    """The table gradient from the dQ kernel's partials, an entry a program
    (``_fold_entry``): the launch where no dK/dV kernel runs to do it."""
    _fold_entry(PART, DT, tl.program_id(0), P, H, OFF, NEG, R, C, E, PCH, ONE_CHUNK)


# ----------------------------------------------------------------------------
# configs: small deterministic heuristics of the shape


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _head_blocks(dk: int, dv: int) -> tuple[int, int]:
    return max(16, _pow2(dk)), max(16, _pow2(dv))


@dataclasses.dataclass(frozen=True)
class _Config:
    """What the heuristics chose for one kernel: constexprs and launch options, and
    for the kernels with a tail block the extent their loop covers (``_full_and_tail``)."""

    constexprs: dict
    num_warps: int
    num_stages: int
    full: int = 0


def _full_and_tail(n: int, block: int, loop_masked: bool = False) -> tuple[int, int]:
    """How n keys (or queries) split between a loop over blocks and one tail block:
    (the extent the loop covers, the tail's size). The tail is the rest padded to the
    next power of 2 (>= 16, for tl.dot), e.g. 196 = 3 x 64 + 16 rather than 4 x 64;
    with loop_masked the loop covers every block, each masked, and there is no tail;
    n within one block is all tail (no loop)."""
    if n <= block:
        full = 0
    elif loop_masked:
        full = cdiv(n, block) * block
    else:
        full = n // block * block
    return full, (max(16, _pow2(n - full)) if n > full else 0)


@functools.cache  # pure in its ints: computed once per shape, not per launch
def _fwd_cfg(nq: int, nk: int, dk: int, dv: int, f32: bool = False) -> _Config:
    bdk, bdv = _head_blocks(dk, dv)
    # float32 (tf32x3 dots: each operand split in two): 32 keys, and 32 queries at Dv 128
    # (64 x 64 spilled 24 B at A1 and 508 B at A4, sm_90a; these none)
    block_m = min(32 if f32 and bdv > 64 else 64, max(16, _pow2(nq)))
    block_n = min(32 if f32 else 64, max(16, _pow2(nk)))
    # full key blocks, then the rest as one tail block; one block of keys (the forward
    # that gathers its bias) is all tail: no loop
    full, tail_n = _full_and_tail(nk, block_n)
    warps = 8 if block_m * bdv > 64 * 64 or (f32 and bdv > 64) else 4
    # one stage: Triton's software pipeline peels a copy of the first iteration's loads
    # and their addresses (A1: 1742 -> 1679 warp instructions per program, estimate);
    # the few key blocks unroll and several programs per SM hide the loads' latency
    return _Config(
        dict(BLOCK_M=block_m, BLOCK_N=block_n, TAIL_N=tail_n, BLOCK_DK=bdk, BLOCK_DV=bdv, DK=dk, DV=dv),
        warps,
        1,
        full,
    )


@functools.cache  # pure in its ints: computed once per shape, not per launch
def _dkdv_cfg(nq: int, nk: int, dk: int, dv: int, vector_loads: bool, f32: bool = False) -> _Config:
    bdk, bdv = _head_blocks(dk, dv)
    # 64 keys x 32 queries on 4 warps, wide heads too (LeViT-256's shrink layers, Dk 32,
    # Dv 128: 64 x 64 spilled) where the rows vectorize. The dS -> dK dot chain puts
    # every warp on the keys: with 8 warps on 64 keys both warpgroups computed the same
    # tile, and 16 keys on 8 warps computed it 8 times; that config stays for wide heads
    # with misaligned rows only (64 keys on 4 warps spilled 16-24 B there, triton 3.9)
    # (float32, never vector_loads, takes 16 keys on 8 warps: 64 keys spilled 764 B at A1
    # on sm_90a and 32 B at A5 on sm_80; and 16 queries with every block masked in the
    # loop, as wide heads: 32 queries spilled 808 B at LeViT-128S's 14 -> 7 shrink layer
    # (Dk 16, Dv 64; 328 B with the masked loop) and 20 B at misaligned A5, sm_90a)
    keys64 = vector_loads or (not f32 and bdk + bdv <= 96)
    block_n = min(64 if keys64 else 16, max(16, _pow2(nk)))
    wide = bdk + bdv > 96
    # 64 queries where there are several blocks of them and the rows vectorize (the
    # loop's fixed work per block halves per query; A1/A5 dK/dV 238/248 -> 373/418
    # instructions per block, estimate; misaligned Dk 32 + Dv 64 spilled 4-196 B); 49
    # queries stay 32 + 32 (one 64-query block issued more: 6.6 -> 9.8 us at A2)
    block_m = min(16 if wide or f32 else (64 if nq > 64 and vector_loads else 32), max(16, _pow2(nq)))
    # full query blocks, then the rest as one tail block (196 queries as 3 x 64 + 16);
    # wide heads (Dk + Dv > 96) take 16 queries and mask every block of the loop
    # instead: 32 queries and a second copy of the block's code spilled 4-44 B at A4
    # (Dv 128, 64 keys)
    loop_masked = (wide or f32) and nq > block_m
    full, tail_m = _full_and_tail(nq, block_m, loop_masked)
    warps = 4 if keys64 else 8
    return _Config(
        dict(BLOCK_M=block_m, BLOCK_N=block_n, FULL=full > 0, TAIL_M=tail_m, LOOP_MASKED=loop_masked,
             BLOCK_DK=bdk, BLOCK_DV=bdv, DK=dk, DV=dv),
        warps,
        2,
        full,
    )


def _dq_blocks(rows: int, cols: int, q_stride: int, max_tile: int = 4096) -> dict[str, int]:
    """Grid-row-aligned blocks for the dQ/table kernel (see the module docstring).

    A query block is QR query-grid rows of CQP column slots (at least 16 slots, for
    tl.dot); every program takes all keys, TRP key-grid rows of CP slots, so a
    (query block x keys) tile of dS holds at most max_tile logits where the query grid
    allows. E slots hold the signed column offsets -(CQP-1)*s .. CP-1 of the
    table-gradient view.
    """
    rq, cq = -(-rows // q_stride), -(-cols // q_stride)
    # at least 16 key slots (tl.dot's K in the dQ dot; a 2 x 2 grid has 4 keys): rows
    # past the grid are masked like any missing key
    cp, cqp = _pow2(cols), _pow2(cq)
    trp = max(_pow2(rows), _pow2(-(-16 // cp)))
    e = _pow2(cp + (cqp - 1) * q_stride)
    qr = max(_pow2(-(-16 // cqp)), min(max(1, max_tile // (cqp * trp * cp)), _pow2(rq)))
    return dict(QR=qr, CQP=cqp, TRP=trp, CP=cp, E=e)


def _dq_key_blocks(rows: int, cols: int, q_stride: int, max_m: int = 64, max_k: int = 32) -> dict[str, int]:
    """Grid-row-aligned blocks for the key-blocked dQ/table kernel (large grids, misaligned
    inputs).

    A query block is QR query-grid rows of CQP column slots, a key block KR key-grid
    rows of CP slots; both at least 16 (tl.dot). E slots hold the signed column
    offsets -(CQP-1)*s .. CP-1 of the table-gradient view; the skew gather of a tile
    has QR*KR*CQP*E elements, kept near 4096.
    """
    rq, cq = -(-rows // q_stride), -(-cols // q_stride)
    cp, cqp = _pow2(cols), _pow2(cq)
    e = _pow2(cp + (cqp - 1) * q_stride)
    qr = max(_pow2(-(-16 // cqp)), min(max(1, max_m // cqp), _pow2(rq)))
    kr = max(_pow2(-(-16 // cp)), min(max(1, max_k // cp), _pow2(rows)))
    while qr * cqp > 16 and qr * kr * cqp * e > 4096:
        qr //= 2
    return dict(QR=qr, CQP=cqp, KR=kr, CP=cp, TRP=_pow2(rows), E=e)


_FOLD_CHUNK_PER_WARP = 128  # table-gradient partials a fold takes at once, per warp (4 a thread)
_DKDV_IN_DQ_MAX = 16 * 128  # key slots x (Dk + Dv) of the dK and dV tiles the dQ kernel may add
_DQ_MAX_KEYS = 256  # key slots (rows and columns padded to powers of 2) one dQ program takes at once


@functools.cache  # pure in its ints: computed once per shape, not per launch
def _dq_cfg(
    rows: int, cols: int, q_stride: int, dk: int, dv: int, all_keys: bool, f32: bool = False, sm90: bool = True
) -> _Config:  # fmt: skip
    bdk, bdv = _head_blocks(dk, dv)
    if all_keys:
        blocks = _dq_blocks(rows, cols, q_stride)
        constexprs = dict(**blocks, BLOCK_DK=bdk, BLOCK_DV=bdv, DK=dk, DV=dv)
        tile = blocks["QR"] * blocks["CQP"] * blocks["TRP"] * blocks["CP"]
        # 4096-logit tiles: 8 warps (two warpgroups on the key rows; the 16-query dQ^T dot
        # then runs on mma.sync, its M = Dk split over warps that repeat each other's
        # work); small heads (Dk + Dv <= 48, LeViT-128S) fit 4 warps in registers (236 at
        # A5, 255 with a local-memory spill at Dk 32, Dv 64)
        warps = 2 if tile < 4096 else 4 if bdk + bdv <= 48 else 8
        return _Config(constexprs, warps, 1)
    wide = bdk + bdv > 96
    # float32 (key blocks only): 16 queries x 16 key slots (A1's 64 x 32 spilled 120 B,
    # 64 x 16 44 B on sm_90a; 16 x 16 none), wide heads on a grid of at most 64 key
    # slots all of them in one block on sm_90a with triton 3.9 (LeViT-256's 7 x 7 shrink
    # layer: 16 keys spilled 8 B, 32 keys 8 B, 64 none), 16 elsewhere (64 keys spilled
    # 8 B with triton 3.6, 4 B on sm_80; 16 none)
    one_kb = wide and _pow2(rows) * _pow2(cols) <= 64 and sm90 and not _TRITON_36
    max_k = (64 if one_kb else 16) if f32 else 32
    blocks = _dq_key_blocks(rows, cols, q_stride, 16 if f32 or wide else 64, max_k)
    constexprs = dict(**blocks, BLOCK_DK=bdk, BLOCK_DV=bdv, DK=dk, DV=dv)
    if f32 and not wide and _pow2(rows) * _pow2(cols) > 64 and sm90:
        # float32 dots on CUDA cores (exact products) rather than tf32x3 on grids of more
        # than 64 key slots, sm_90a: its split operands spilled 12-112 B at LeViT-128S's
        # 14 -> 7 shrink layer and the 448-px layer (a 32-slot grid row: tiles no smaller
        # than 32 x 32), ieee none; wide heads keep tf32x3 (ieee spilled 52 B at A4), and
        # so do small grids (ieee spilled 4 B at 128 registers on a 4 x 4 grid, Dk 16 Dv
        # 32) and sm_80 (ieee spilled 16 B at A5 there, 128 registers; tf32x3 none)
        constexprs["PREC"] = "ieee"
    tile = blocks["QR"] * blocks["CQP"] * blocks["KR"] * blocks["CP"]
    # small tiles (A3's 4x4 grid) with Dk + Dv = 96: 4 and 8 warps spill 4-20 B in
    # some of triton 3.6/3.9 x sm_80/sm_90a x aligned/misaligned pointers, 16 in none;
    # wider heads (Dv 128) spill 24-48 B on 16 warps (128 registers), none on 8
    num_warps = 8 if tile >= 2048 or wide or f32 else 16 if bdk + bdv == 96 else 4
    return _Config(constexprs, num_warps, 1)


# float32's own tiles (``float32_tiles``): its tf32x3 dots split each operand in two, and
# the 16-bit tiles spilled 0.5-2.4 KB at A1, A4 and A5 (sm_90a); tests set this to run
# them under the interpreter
_F32_TILES_ON_CPU = False


def _f32_tiles(t: torch.Tensor) -> bool:
    return float32_tiles(t, _F32_TILES_ON_CPU)


def aligned_strides(*tensors: torch.Tensor) -> bool:
    """``_vector_loads`` without the data pointers (which fake tensors lack): whether
    every row of every tensor is contiguous and a multiple of 16 bytes from the next."""
    for t in tensors:
        step = 16 // t.element_size()
        if t.stride(-1) != 1 or any(s % step for s in t.stride()[:-1]):
            return False
    return True


def _vector_loads(*tensors: torch.Tensor) -> bool:
    """Whether every row of every tensor starts 16-byte aligned and is contiguous (its
    loads vectorize; the backward's larger tiles need that to stay in registers), and
    none takes float32's tiles (``_f32_tiles``)."""
    for t in tensors:
        if _f32_tiles(t) or t.data_ptr() % 16:
            return False
    return aligned_strides(*tensors)


def _batch_group(batch: int, programs_per_batch: int) -> int:
    """Batch entries per dQ program: enough programs to fill a GPU, few table partials."""
    group = 1
    while group < 16 and group * 2 <= batch and programs_per_batch * -(-batch // (group * 2)) >= 512:
        group *= 2
    return group


# ----------------------------------------------------------------------------
# launchers

_alloc = alloc  # every buffer the launchers hand to a kernel (tests poison them)


def _query_grid(fmap_rows: int, fmap_cols: int, q_stride: int) -> tuple[int, int]:
    return -(-fmap_rows // q_stride), -(-fmap_cols // q_stride)


def _tag(q: torch.Tensor, nk: int, dv: int, q_stride: int) -> str:
    B, H, NQ, DK = q.shape
    return f"{SHORT[q.dtype]},Nq{NQ},Nk{nk},Dk{DK},Dv{dv},S{q_stride}"


def _expand_tile_bias(
    table: torch.Tensor, nq: int, nk: int, cq: int, cols: int, q_stride: int, mult: float,
    block_r: int, block_c: int, c_full: int, tail_c: int, key_rows: bool, name: str,
) -> torch.Tensor:  # fmt: skip
    """The table expanded in an attention kernel's tiles (``_tile_bias_kernel``): (H, row
    blocks, block_r * (c_full + tail_c)) float32, times mult; rows are queries and
    columns keys, or with key_rows keys and queries. Built from the table on every
    call, so it is never stale."""
    H = table.shape[0]
    num_rb, num_ct = cdiv(nk if key_rows else nq, block_r), c_full // block_c + (tail_c > 0)
    bias = _alloc((H, num_rb, block_r * (c_full + tail_c)), torch.float32, table.device)
    launch(Launch(
        name, _tile_bias_kernel, (H * num_rb * num_ct,),
        [table, bias, *table.stride(), mult],
        dict(NQ=nq, NK=nk, CQ=cq, C=cols, S=q_stride, BLOCK_R=block_r, BLOCK_C=block_c, NC_FULL=c_full,
             TAIL_C=tail_c, KEY_ROWS=key_rows), 4, 1, reads=(table,), writes=(bias,),
    ))  # fmt: skip
    return bias


_MIN_SCALE = 2.0**-10  # |scale| below this (0 too) is folded into q (see relpos_attention_fwd)


_FWD_MIN_PROGRAMS = 512  # programs a forward keeps at least when it groups batch entries


def _fwd_group(batch: int, programs_per_batch: int) -> int:
    """Batch entries per forward program where it gathers its bias (once for all of
    them): a divisor of the batch, up to 4, with at least _FWD_MIN_PROGRAMS programs left."""
    group = 1
    while group < 4 and batch % (group * 2) == 0 and programs_per_batch * batch // (group * 2) >= _FWD_MIN_PROGRAMS:
        group *= 2
    return group


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out (B, H, Nq, Dv) q.dtype, lse (B, H, Nq) float32). See the module docstring."""
    B, H, NQ, DK = q.shape
    NK, DV = k.shape[2], v.shape[3]
    out = _alloc((B, H, NQ, DV), q.dtype, q.device)
    lse = _alloc((B, H, NQ), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    # the kernel divides the bias by c = scale * log2(e) and needs c > 0 (its max runs
    # on q.k + bias / c): a negative scale negates q (exact), and a scale near 0 is
    # folded into q (q * scale rounded to q's dtype: an error of that rounding times
    # |scale * q.k|, below 2**-10 * |q.k| ulps), with c = log2(e)
    if scale <= -_MIN_SCALE:
        q, scale = -q, -scale
    elif scale < _MIN_SCALE:
        q, scale = q * scale, 1.0
    cfg = _fwd_cfg(NQ, NK, DK, DV, _f32_tiles(q))
    block_m, block_n = cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"]
    tag = _tag(q, NK, DV, q_stride)
    # one key block: the forward gathers its bias tile from the table (no bias launch),
    # once for a group of batch entries
    gather = NK <= block_n
    mult = bias_scale / scale
    _, cq = _query_grid(fmap_rows, fmap_cols, q_stride)
    bias = table if gather else _expand_tile_bias(
        table, NQ, NK, cq, fmap_cols, q_stride, mult, block_m, block_n, cfg.full, cfg.constexprs["TAIL_N"], False,
        f"relpos_fwd_bias[{tag}]",
    )
    num_qb = triton.cdiv(NQ, block_m)
    group = _fwd_group(B, num_qb * H) if gather else 1
    nk_full = cfg.full
    launch(Launch(
        f"relpos_fwd[{tag}]", _fwd_kernel, (num_qb * H * (B // group),),
        [q, k, v, bias, table, out, lse,
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), *table.stride(),
         scale * _LOG2E, mult],
        {**cfg.constexprs, "H": H, "NQ": NQ, "NK": NK, "NK_FULL": nk_full, "CQ": cq, "C": fmap_cols, "S": q_stride,
         "GROUP": group, "GATHER": gather, "BIAS_ACC": target_arch(q.device) >= 90,
         "PREC": dot_precision(q.dtype, "tf32x3")}, cfg.num_warps,
        cfg.num_stages, reads=(q, k, v, table) if gather else (q, k, v, bias), writes=(out, lse),
        loops={"_start_n": max(0, nk_full // block_n - 1), "g": group},
    ))  # fmt: skip
    return out, lse


def _dkdv_in_dq(cx: dict, num_qb: int, dk: int, dv: int) -> bool:
    """Whether the all-keys dQ kernel (constexprs cx) also writes dK and dV: one query
    block, and dK/dV tiles small enough (``_DKDV_IN_DQ_MAX``)."""
    return num_qb == 1 and cx["TRP"] * cx["CP"] * (_pow2(dk) + _pow2(dv)) <= _DKDV_IN_DQ_MAX


def faulting_dq(
    fmap_rows: int, fmap_cols: int, q_stride: int, dk: int, dv: int, dtype: torch.dtype, arch: int, scale: float,
    aligned_rows: bool = True,
) -> bool:  # fmt: skip
    """Whether the backward of these inputs would launch the dQ kernel in the
    configuration that raised an illegal memory access on a GPU: ``_bwd_dq_kernel``
    taking every key in one block of 64 query slots against 64 key slots, with Dk
    blocks of 32 or more, in float16 or bfloat16 (H200, triton 3.6, 2026-12-04,
    bench/NOTES.md: LeViT-256's 7 x 7 stage, B 8 and B 1; the same kernel at Dk 16, and
    float32 with its own tiles, were right; the Triton interpreter finds no
    out-of-bounds access). Mirrors ``relpos_attention_bwd``'s choices; aligned_rows:
    whether q, k, v's rows may start 16-byte aligned (``_vector_loads``; where they
    cannot, the key-blocked dQ kernel runs instead)."""
    if dtype not in (torch.float16, torch.bfloat16) or not aligned_rows:
        return False
    if _pow2(fmap_rows) * _pow2(fmap_cols) > _DQ_MAX_KEYS:
        return False
    cx = _dq_cfg(fmap_rows, fmap_cols, q_stride, dk, dv, True, False, arch >= 90).constexprs
    rq, _ = _query_grid(fmap_rows, fmap_cols, q_stride)
    if _dkdv_in_dq(cx, cdiv(rq, cx["QR"]), dk, dv) or _fused(fmap_rows, fmap_cols, q_stride, dk, dv, arch, scale, dtype):
        return False
    return cx["QR"] * cx["CQP"] == 64 and cx["TRP"] * cx["CP"] == 64 and cx["BLOCK_DK"] >= 32


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv in q.dtype, dtable (H, R*C) in table.dtype). See the module docstring."""
    B, H, NQ, DK = q.shape
    NK, DV = k.shape[2], v.shape[3]
    dev = q.device
    dq = _alloc((B, H, NQ, DK), q.dtype, dev)
    dk = _alloc((B, H, NK, DK), q.dtype, dev)
    dv = _alloc((B, H, NK, DV), q.dtype, dev)
    if B * H == 0 or NQ == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), torch.zeros(table.shape, dtype=table.dtype, device=dev)
    rq, cq = _query_grid(fmap_rows, fmap_cols, q_stride)
    qk_scale = scale * _LOG2E
    prec = dot_precision(q.dtype, "tf32x3")
    tag = _tag(q, NK, DV, q_stride)
    vector_loads = _vector_loads(q, k, v, grad_out, out)
    # every key at once where the grid is small and the rows vectorize; else key blocks
    all_keys = _pow2(fmap_rows) * _pow2(fmap_cols) <= _DQ_MAX_KEYS and vector_loads
    dq_cfg = _dq_cfg(fmap_rows, fmap_cols, q_stride, DK, DV, all_keys, _f32_tiles(q), target_arch(dev) >= 90)
    QR, CQP = dq_cfg.constexprs["QR"], dq_cfg.constexprs["CQP"]
    num_qb = triton.cdiv(rq, QR)
    group = _batch_group(B, num_qb * H)
    num_g = triton.cdiv(B, group)
    E = dq_cfg.constexprs["E"]
    # one query block of every query against every key (small grids): the dQ kernel has
    # each (b, h)'s whole P and dS and writes dK and dV too, where their tiles are small
    # (A3's 16 keys x (Dk 32 + Dv 64); 64 keys spilled 52-600 B at A2 and the 7 x 7
    # shrink layers, sm_90a)
    dkdv_in_dq = all_keys and _dkdv_in_dq(dq_cfg.constexprs, num_qb, DK, DV)
    if all_keys and not dkdv_in_dq and _fused(fmap_rows, fmap_cols, q_stride, DK, DV, target_arch(dev), scale, q.dtype):
        return _bwd_fused(grad_out, q, k, v, table, out, lse, dq, dk, dv, fmap_rows, fmap_cols, q_stride, scale,
                          bias_scale, tag)  # fmt: skip
    # rowsum(dO * O): the all-keys dQ kernel on 8 warps (A1, A4: up to 181 registers), or on
    # 4 warps with 16-query blocks (A5: 240-253 registers), writes it and dK/dV reads it
    # (A5 relpos_dkdv 35.3 -> 29.7 us, estimate); elsewhere dK/dV computes it from O: the
    # other 2- and 4-warp dQ configs and the key-blocked kernel run at 236-255 registers,
    # where the one store more spilled 8-44 B (the 7 x 7 layers at 64 queries with triton
    # 3.6 sm_90a; misaligned rows, triton 3.9). lse stands in for the pointer neither
    # kernel then uses
    stores_delta = dq_cfg.num_warps == 8 or (
        dq_cfg.num_warps == 4 and dq_cfg.constexprs["QR"] * dq_cfg.constexprs["CQP"] == 16
    )
    delta_from_o = not (all_keys and stores_delta) or dkdv_in_dq
    delta = lse if delta_from_o else _alloc((B, H, NQ), torch.float32, dev)
    partial = _alloc((num_g * num_qb, H, fmap_rows, E), torch.float32, dev)
    dtable = _alloc((H, fmap_rows * fmap_cols), table.dtype, dev)
    off = (CQP - 1) * q_stride
    fold = _Fold(partial, dtable, off, min(off, fmap_cols - 1), E)
    dkdv = None if dkdv_in_dq else _DkdvPlan.of(q, k, v, scale, bias_scale, vector_loads)
    # the all-keys dQ kernel writes the dK/dV kernel's bias tiles (from this call's
    # table), a chunk of at most 16 floats a thread per program (1 at A1); else they
    # have a launch
    programs = num_qb * H * num_g
    chunk = dkdv.tile_chunk(programs, 512 * dq_cfg.num_warps) if dkdv is not None and all_keys else 0
    tiles = chunk > 0
    bias = _alloc(dkdv.tiles_shape, torch.float32, dev) if tiles else lse  # lse: a pointer not used
    tile_cx = dict(TILES=tiles, TILE_BM=dkdv.block_n if tiles else 16, TILE_NCOLS=dkdv.ncols if tiles else 16,
                   TILE_RB=dkdv.num_kb if tiles else 1, TILE_CHUNK=max(chunk, 1))  # fmt: skip
    dkdv_args = [dk, dv] if dkdv_in_dq else [lse, lse]  # lse: a pointer the kernel does not use
    launch(Launch(
        f"relpos_dq[{tag}]", _bwd_dq_kernel if all_keys else _bwd_dq_blocked_kernel, (programs,),
        [q, k, v, table, grad_out, out, lse, dq, partial, *([delta, *dkdv_args, bias] if all_keys else []),
         *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *out.stride(), *table.stride(),
         B, H, NQ, fmap_rows, fmap_cols, rq, cq, q_stride, num_qb, group,
         qk_scale, scale, bias_scale * _LOG2E, bias_scale, *([dkdv.mult if tiles else 1.0] if all_keys else [])],
        {"PREC": prec, **dq_cfg.constexprs,
         **(dict(STORE_DELTA=not delta_from_o, DKDV=dkdv_in_dq, **tile_cx) if all_keys else {})},
        dq_cfg.num_warps, dq_cfg.num_stages,
        reads=(q, k, v, table, grad_out, out, lse),
        writes=(dq, partial) + ((dk, dv) if dkdv_in_dq else ()) + (() if delta_from_o else (delta,))
        + ((bias,) if tiles else ()),
        loops={"b": B / num_g} if all_keys else {"b": B / num_g, "kb": triton.cdiv(fmap_rows, dq_cfg.constexprs["KR"])},
    ))  # fmt: skip
    if dkdv is not None:
        _launch_dkdv(dkdv, q, k, v, table, grad_out, out, lse, delta, dk, dv, bias if tiles else None, fold,
                     fmap_rows, fmap_cols, q_stride, scale, delta_from_o, tag)  # fmt: skip
    else:  # fixed-order reductions: over programs, then signed column offsets dc -> |dc|
        pch = min(_pow2(partial.shape[0]), _FOLD_CHUNK_PER_WARP)
        launch(Launch(
            f"relpos_fold[{tag}]", _fold_kernel, (dtable.numel(),),
            [partial, dtable, partial.shape[0], H, fold.off, fold.neg],
            dict(R=fmap_rows, C=fmap_cols, E=E, PCH=pch, ONE_CHUNK=partial.shape[0] <= pch), 1, 1,
            reads=(partial,), writes=(dtable,),
            loops={"p0": cdiv(partial.shape[0], pch)},
        ))  # fmt: skip
    return dq, dk, dv, dtable


_FUSED_MIN_KEYS = 160  # keys from which the fused backward runs (A5's 196; tests lower it)
_FUSED_MAX_DK, _FUSED_MAX_DV = 16, 32  # head sizes (padded) up to which it runs (Dk 32, Dv 16 spilled 60 B)
_FUSED_QUERY_SLOTS = 32  # query slots of its blocks
# batch entries a fused program takes: _FUSED_GROUP where that leaves at least
# _FUSED_MIN_PROGRAMS programs (one per SM of an H100/H200; A5: 256 programs), else 2
_FUSED_GROUP, _FUSED_MIN_PROGRAMS = 4, 132
# float32 inputs keep the dQ and dK/dV launches (A5's fused kernel with tf32x3 dots
# spilled 1356 B, sm_90a); the interpreter tests, without bfloat16, run it in float32
_FUSED_FLOAT32 = False


def _fused(rows: int, cols: int, q_stride: int, dk: int, dv: int, arch: int, scale: float,
           dtype: torch.dtype) -> bool:  # fmt: skip
    """Whether the backward is the fused launch (``_bwd_fused_kernel``) between its bias
    launch and the fold, where the dQ kernel takes every key: small heads on large grids
    on sm_90 (A5; bench/NOTES.md, 2026-12-01), a positive scale not near 0 (the bias
    tiles are divided by it), 16-bit inputs, and blocks of at most 32 query slots, a
    one-hot matrix of at most 256 x 32 (grids one row wide are left out)."""
    bdk, bdv = _head_blocks(dk, dv)
    if rows * cols < _FUSED_MIN_KEYS or bdk > _FUSED_MAX_DK or bdv > _FUSED_MAX_DV or arch < 90 or scale < _MIN_SCALE:
        return False
    if dtype == torch.float32 and not _FUSED_FLOAT32:
        return False
    cx = _fused_cfg(rows, cols, q_stride, dk, dv).constexprs
    return cx["QR"] * cx["CQP"] <= _FUSED_QUERY_SLOTS and cx["CP"] * cx["CQP"] <= 256 and cx["E"] <= 32


def _bwd_fused(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    fmap_rows: int, fmap_cols: int, q_stride: int, scale: float, bias_scale: float, tag: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused backward (``_bwd_fused_kernel``): its bias tiles' launch, the fused
    launch (a program per head and batch group), then the fold of the table gradient."""
    B, H, NQ, DK = q.shape
    NK, DV = k.shape[2], v.shape[3]
    dev = q.device
    rq, cq = _query_grid(fmap_rows, fmap_cols, q_stride)
    cfg = _fused_cfg(fmap_rows, fmap_cols, q_stride, DK, DV)
    cx = cfg.constexprs
    num_qb = triton.cdiv(rq, cx["QR"])
    group = _FUSED_GROUP if H * cdiv(B, _FUSED_GROUP) >= _FUSED_MIN_PROGRAMS else min(2, B)
    num_g = triton.cdiv(B, group)
    E = cx["E"]
    tile = cx["TRP"] * cx["CP"] * cx["QR"] * cx["CQP"]
    bias = _alloc((H, num_qb, tile), torch.float32, dev)
    chunk = 1024
    launch(Launch(
        f"relpos_bwd_bias[{tag}]", _fused_bias_kernel, (cdiv(bias.numel(), chunk),),
        [table, bias, *table.stride(), bias_scale / scale, H, NQ, NK, fmap_rows, fmap_cols, rq, cq, q_stride,
         num_qb],
        dict(QR=cx["QR"], CQP=cx["CQP"], TRP=cx["TRP"], CP=cx["CP"], CHUNK=chunk), 4, 1,
        reads=(table,), writes=(bias,),
    ))  # fmt: skip
    partial = _alloc((num_g, H, fmap_rows, E), torch.float32, dev)
    dtable = _alloc((H, fmap_rows * fmap_cols), table.dtype, dev)
    launch(Launch(
        f"relpos_bwd_fused[{tag}]", _bwd_fused_kernel, (num_g * H,),
        [q, k, v, bias, grad_out, out, lse, dq, dk, dv, partial,
         *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *out.stride(),
         B, H, NQ, fmap_rows, fmap_cols, rq, cq, q_stride, num_qb, group, scale * _LOG2E, scale, bias_scale],
        {**cx, "TERM_F16": dev.type == "cpu",
         "KT_RELOAD": _TRITON_36,
         # the table gathers' rows at a time: all 4 * QR at once (triton 3.6 spilled
         # 4-12 B with 2-8; a row at a time it does not)
         "GATHER_ROWS": 1 if _TRITON_36 else 4 * cx["QR"],
         "PREC": dot_precision(q.dtype, "tf32x3")},
        cfg.num_warps, cfg.num_stages,
        reads=(q, k, v, bias, grad_out, out, lse), writes=(dq, dk, dv, partial),
        loops={"fb": B / num_g, "qb": num_qb},
    ))  # fmt: skip
    off = (cx["CQP"] - 1) * q_stride
    pch = min(_pow2(num_g), _FOLD_CHUNK_PER_WARP)
    launch(Launch(
        f"relpos_fold[{tag}]", _fold_kernel, (dtable.numel(),),
        [partial, dtable, num_g, H, off, min(off, fmap_cols - 1)],
        dict(R=fmap_rows, C=fmap_cols, E=E, PCH=pch, ONE_CHUNK=num_g <= pch), 1, 1,
        reads=(partial,), writes=(dtable,),
        loops={"p0": cdiv(num_g, pch)},
    ))  # fmt: skip
    return dq, dk, dv, dtable


@functools.cache  # pure in its ints: computed once per shape, not per launch
def _fused_cfg(rows: int, cols: int, q_stride: int, dk: int, dv: int) -> _Config:
    bdk, bdv = _head_blocks(dk, dv)
    blocks = _dq_blocks(rows, cols, q_stride)
    rq = -(-rows // q_stride)
    # at least 16 query slots (tl.dot's K in the dK dot), up to _FUSED_QUERY_SLOTS
    blocks["QR"] = max(_pow2(-(-16 // blocks["CQP"])), min(_FUSED_QUERY_SLOTS // blocks["CQP"], _pow2(rq)))
    # 8 warps: two warpgroups on the key rows (the dots' M); the dQ^T dot (M = Dk)
    # runs on mma.sync with warps splitting its 32 query columns
    return _Config(dict(**blocks, BLOCK_DK=bdk, BLOCK_DV=bdv, DK=dk, DV=dv), 8, 1)


@dataclasses.dataclass(frozen=True)
class _Fold:
    """The dQ kernel's table-gradient partials (P, H, R, E) and what folds them into
    dtable (``_fold_entry``): the column of dc = 0, the largest negative offset folded."""

    partial: torch.Tensor
    dtable: torch.Tensor
    off: int
    neg: int
    e: int


@dataclasses.dataclass(frozen=True)
class _DkdvPlan:
    """The dK/dV launch's config and the bias it reads (``_launch_dkdv``)."""

    cfg: _Config
    gather: bool  # one query block: the kernel gathers its bias tile from the table
    bias_acc: bool
    mult: float
    num_kb: int
    block_n: int
    ncols: int  # query columns of a key block's tiles (loop extent and tail)
    heads: int

    @staticmethod
    def of(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias_scale: float, vector_loads: bool
    ) -> _DkdvPlan:
        B, H, NQ, DK = q.shape
        NK, DV = k.shape[2], v.shape[3]
        cfg = _dkdv_cfg(NQ, NK, DK, DV, vector_loads, _f32_tiles(q))
        block_n = cfg.constexprs["BLOCK_N"]
        # the bias divided by c = scale * log2(e) starts the K Q^T dot's accumulator where c
        # is positive and not tiny (as in the forward) and the dot is a 64-key wgmma on 4
        # warps (sm_90a; the tile's load is then in the accumulator's layout: 32 keys at Dv
        # 128 spilled 8 B, 255 registers); else it is in log2 units, added after the dot
        bias_acc = target_arch(q.device) >= 90 and scale >= _MIN_SCALE and block_n == 64 and cfg.num_warps == 4
        mult = bias_scale / scale if bias_acc else bias_scale * _LOG2E
        return _DkdvPlan(cfg, not cfg.constexprs["FULL"], bias_acc, mult, cdiv(NK, block_n), block_n,
                         cfg.full + cfg.constexprs["TAIL_M"], H)  # fmt: skip

    @property
    def tiles_shape(self) -> tuple[int, int, int] | None:
        """The bias tiles' shape (H, key blocks, keys x query columns); None where the
        kernel gathers its bias instead."""
        return None if self.gather else (self.heads, self.num_kb, self.block_n * self.ncols)

    def tile_chunk(self, programs: int, max_chunk: int) -> int:
        """Floats of the bias tiles each of ``programs`` programs writes (a power of two),
        or 0 where there are no tiles or a chunk would exceed ``max_chunk``."""
        if self.tiles_shape is None:
            return 0
        chunk = _pow2(cdiv(math.prod(self.tiles_shape), programs))
        return chunk if chunk <= max_chunk else 0


def _launch_dkdv(
    plan: _DkdvPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, grad_out: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    bias: torch.Tensor | None, fold: _Fold, fmap_rows: int, fmap_cols: int, q_stride: int, scale: float,
    delta_from_o: bool, tag: str,
) -> None:  # fmt: skip
    """The dK/dV launch, which also folds the table gradient (``_fold_entry``), and the
    expanded bias it reads where it loops over query blocks and the dQ kernel did not
    write it (bias None)."""
    B, H, NQ, DK = q.shape
    NK = k.shape[2]
    cfg = plan.cfg
    _, cq = _query_grid(fmap_rows, fmap_cols, q_stride)
    block_m, block_n = cfg.constexprs["BLOCK_M"], plan.block_n
    nq_full = cfg.full
    programs = plan.num_kb * B * H
    if plan.gather:
        bias = table
    elif bias is None:
        bias = _expand_tile_bias(
            table, NQ, NK, cq, fmap_cols, q_stride, plan.mult, block_n, block_m, nq_full,
            cfg.constexprs["TAIL_M"], True, f"relpos_dkdv_bias[{tag}]",
        )  # fmt: skip
    # the fold: an entry of dtable per program (several where the entries outnumber the
    # programs), every partial in one tile up to 4 a thread (a loop had ptxas unroll it)
    parts = fold.partial.shape[0]
    pch = min(_pow2(parts), _FOLD_CHUNK_PER_WARP * cfg.num_warps)
    launch(Launch(
        f"relpos_dkdv[{tag}]", _bwd_dkdv_kernel, (programs,),
        [q, k, v, bias, table, grad_out, out, lse, delta, dk, dv, fold.partial, fold.dtable,
         *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *out.stride(), *table.stride(),
         H, NQ, nq_full, NK, plan.num_kb, cq, fmap_cols, q_stride, scale * _LOG2E, scale, plan.mult,
         programs, parts, fold.off, fold.neg],
        {**cfg.constexprs, "GATHER": plan.gather, "DELTA_FROM_O": delta_from_o, "BIAS_ACC": plan.bias_acc,
         "FOLD_R": fmap_rows, "FOLD_C": fmap_cols, "FOLD_E": fold.e, "FOLD_PCH": pch, "FOLD_ONE": parts <= pch,
         "PREC": dot_precision(q.dtype, "tf32x3")}, cfg.num_warps, cfg.num_stages,
        reads=(q, k, v, table if plan.gather else bias, grad_out, lse, fold.partial)
        + ((out,) if delta_from_o else (delta,)),
        writes=(dk, dv, fold.dtable),
        loops={"start_m": nq_full // block_m, "o": cdiv(fold.dtable.numel(), programs), "p0": cdiv(parts, pch)},
    ))  # fmt: skip


# ----------------------------------------------------------------------------
# the launches of one workload shape (ahead-of-time compiles, the estimate)


def record_calls(
    shape: RelposShape, batch: int, dtype: torch.dtype, direction: str, tensor: TensorFactory
) -> None:
    """Call the launcher of one direction ("fwd" or "bwd") as the op calls it on
    contiguous (B, H, N, D) inputs and an "hn" table made by ``tensor(shape, dtype)``
    (meta tensors, inside ``recording()``)."""
    record_grid(shape.side, shape.side, shape.q_stride, shape.heads, shape.dk, shape.dv, batch, dtype,
                direction, tensor)  # fmt: skip


def record_grid(
    rows: int, cols: int, q_stride: int, heads: int, dk: int, dv: int, batch: int, dtype: torch.dtype,
    direction: str, tensor: TensorFactory,
) -> None:  # fmt: skip
    """``record_calls`` for a key grid of ``rows`` x ``cols`` (not only square ones)."""
    B, H = batch, heads
    nq, nk = cdiv(rows, q_stride) * cdiv(cols, q_stride), rows * cols
    q, k = tensor((B, H, nq, dk), dtype), tensor((B, H, nk, dk), dtype)
    v, table = tensor((B, H, nk, dv), dtype), tensor((H, nk), dtype)
    args = (rows, cols, q_stride, dk**-0.5, 1.0)
    if direction == "fwd":
        relpos_attention_fwd(q, k, v, table, *args)
    else:
        out, lse = tensor((B, H, nq, dv), dtype), tensor((B, H, nq), torch.float32)
        relpos_attention_bwd(tensor((B, H, nq, dv), dtype), q, k, v, table, out, lse, *args)
