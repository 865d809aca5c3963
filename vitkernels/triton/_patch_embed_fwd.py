"""Forward kernels of ``patch_embed`` (launchers: ``patch_embed.py``) and the
patch-gathering helpers the backward kernels share.

* ``_patch_embed_fwd_kernel``: tokens = out_norm(in_norm(patches) @ W.T + bias)
  (+ pos, cls) for a tile of rows, the patches gathered from the image inside the
  loads; with SAVE_Y also what the backward reads (the pre-norm tokens, both norms'
  row statistics); also the backward's recompute of the pre-norm tokens.
* ``_prep_kernel``: the input norm folded into the weight (W * g, its row sums and
  in_bias @ W.T + bias), in the kernel's patch order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vitkernels.triton._common import hint as _hint
from vitkernels.triton._common import mask2 as _mask2


@triton.jit
def _idx(i, IDX64: tl.constexpr):
    """An index in the integer width the launcher asked for (int64 for huge tensors)."""
    if IDX64:
        return i.to(tl.int64)
    return i


@triton.jit
def _patch_rows(
    pid_m, M, L, Wout, SH, SW, PH, PW, sxb, sxh, sxw, BLOCK_M: tl.constexpr, IDX64: tl.constexpr,
    RCP_ROWS: tl.constexpr = False,
):
    """Row m = b * L + l of the GEMM -> image offset of the patch's top-left pixel.

    RCP_ROWS (the launcher checks L + BLOCK_M < 2^20): the block's first row is divided
    once (scalars), and each row's quotients by L and Wout, all of integers below 2^20,
    come from a float reciprocal: floor((x + 0.5) * (1 / d)) is exact there (its rounding
    error, the reciprocal's 2 ulp included, stays under the 0.5 / d by which (x + 0.5) / d
    misses an integer), and costs a few
    instructions per row where an integer division by a runtime divisor costs about ten
    (a loop that recomputes the rows every block spent a third of its instructions on
    them)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    if RCP_ROWS:
        m0 = pid_m * BLOCK_M
        l_start = m0 % L + tl.arange(0, BLOCK_M)  # < L + BLOCK_M
        wraps = ((l_start.to(tl.float32) + 0.5) * (1.0 / tl.cast(L, tl.float32))).to(tl.int32)
        b = m0 // L + wraps
        l = l_start - wraps * L
        lr = ((l.to(tl.float32) + 0.5) * (1.0 / tl.cast(Wout, tl.float32))).to(tl.int32)
        ih0 = lr * SH - PH
        iw0 = (l - lr * Wout) * SW - PW
    else:
        b = offs_m // L
        l = offs_m % L
        ih0 = (l // Wout) * SH - PH
        iw0 = (l % Wout) * SW - PW
    row_base = _idx(b, IDX64) * sxb + ih0 * sxh + iw0 * sxw  # may point into the padding
    return offs_m, row_ok, b, l, ih0, iw0, row_base


@triton.jit
def _divmod_small(x, d):
    """(x // d, x % d) for integers 0 <= x < 2^20 and d >= 1, by a float32 reciprocal
    (exact there: ``_patch_rows``), a few instructions where a division by a runtime
    divisor costs a dozen or more."""
    quo = ((x.to(tl.float32) + 0.5) * (1.0 / tl.cast(d, tl.float32))).to(tl.int32)
    return quo, x - quo * d


@triton.jit
def _k_digits(offs_k, C, KW, KHW, PQC: tl.constexpr, SMALL: tl.constexpr = False):
    """k -> its (c, p, q) in the patch (once per program). SMALL: every k < 2^20
    (float reciprocals; integer divisions without)."""
    if SMALL:
        if PQC:  # k = (p * KW + q) * C + c
            pq, c = _divmod_small(offs_k, C)
        else:  # k = c * KH * KW + p * KW + q
            c, pq = _divmod_small(offs_k, KHW)
        p, q = _divmod_small(pq, KW)
        return c, p, q
    if PQC:
        c = offs_k % C
        pq = offs_k // C
    else:
        c = offs_k // KHW
        pq = offs_k % KHW
    return c, pq // KW, pq % KW


@triton.jit
def _k_deltas(C, KW, KHW, BLOCK_K: tl.constexpr, PQC: tl.constexpr):
    """The digits of BLOCK_K (scalars), each below its radix but the outermost
    (BLOCK_K < 2^20: float reciprocals)."""
    bk = C * 0 + BLOCK_K
    if PQC:
        bq, dc = _divmod_small(bk, C)
        dp, dq = _divmod_small(bq, KW)
        return dc, dp, dq
    bq, dq = _divmod_small(bk, KW)
    dc, dp = _divmod_small(bq, KHW // KW)
    return dc, dp, dq


@triton.jit
def _k_advance(c, p, q, dc, dp, dq, C, KW, KHW, PQC: tl.constexpr):
    """The digits of k + BLOCK_K from those of k: a mixed-radix add (no division).
    The outermost digit grows past its radix for k >= K (masked by the caller)."""
    if PQC:  # radices: c (C) fastest, then q (KW), then p
        c = c + dc
        cy = c >= C
        c = tl.where(cy, c - C, c)
        q = q + dq + cy.to(tl.int32)
        cy = q >= KW
        q = tl.where(cy, q - KW, q)
        p = p + dp + cy.to(tl.int32)
    else:  # radices: q (KW) fastest, then p (KH), then c
        KH = KHW // KW
        q = q + dq
        cy = q >= KW
        q = tl.where(cy, q - KW, q)
        p = p + dp + cy.to(tl.int32)
        cy = p >= KH
        p = tl.where(cy, p - KH, p)
        c = c + dc + cy.to(tl.int32)
    return c, p, q


@triton.jit
def _patch_tile(
    x_ptr, row_base, ih0, iw0, row_ok, c, p, q, k_ok, H, W, sxc, sxh, sxw,
    MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr, VEC: tl.constexpr,
):
    """(BLOCK_M, BLOCK_K) tile of unfold(images) for the k whose digits are (c, p, q):
    zero outside the image (padding), past M and where k_ok is false."""
    col = c * sxc + p * sxh + q * sxw
    ptrs = _hint(x_ptr, row_base[:, None] + col[None, :], 1, VEC)
    if MASK_HW:
        # rows past M and k >= K pushed out of the image along h, then one unsigned
        # compare per bound and element (a negative coordinate wraps above H, W)
        far = 1 << 30
        ih0m = tl.where(row_ok, ih0, far)
        pm = tl.where(k_ok, p, far)
        ih = (ih0m[:, None] + pm[None, :]).to(tl.uint32)
        iw = (iw0[:, None] + q[None, :]).to(tl.uint32)
        mask = (ih < tl.cast(H, tl.uint32)) & (iw < tl.cast(W, tl.uint32))
        if VEC > 1:
            mask = tl.max_constancy(mask, [1, VEC])
        return tl.load(ptrs, mask=mask, other=0.0)
    elif EVEN_M and EVEN_K:
        return tl.load(ptrs)
    elif EVEN_K:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=_mask2(row_ok, k_ok, 1, VEC), other=0.0)


@triton.jit
def _row_bits(ih0, iw0, row_ok, H, W):
    """Each row's in-image kernel offsets as one int32 word (kernels of at most 15 x 15,
    the launcher's HW_BITS): bit p for image row ih0 + p inside [0, H), bit 16 + q for
    column iw0 + q inside [0, W); 0 past M. Bit 15 is never set (``_k_bits``)."""
    plo = tl.minimum(tl.maximum(-ih0, 0), 15)
    phi = tl.minimum(tl.maximum(H - ih0, 0), 15)  # >= plo
    qlo = tl.minimum(tl.maximum(-iw0, 0), 15)
    qhi = tl.minimum(tl.maximum(W - iw0, 0), 15)
    bits = ((1 << phi) - (1 << plo)) | (((1 << qhi) - (1 << qlo)) << 16)
    return tl.where(row_ok, bits, 0)


@triton.jit
def _k_bits(p, q, k_ok, FULL_K: tl.constexpr):
    """Each k's kernel offsets as the bits ``_row_bits`` tests (bit 15, never set there,
    where k_ok is false): element (m, k) is inside the image when
    row_bits[m] & k_bits[k] == k_bits[k], two instructions per element where the
    coordinates' adds and compares took about five."""
    bits = (1 << p) | (1 << (q + 16))
    if not FULL_K:
        bits = tl.where(k_ok, bits, 1 << 15)
    return bits


@triton.jit
def _gemm_rows(
    x_ptr, w_ptr, row_base, ih0, iw0, row_ok, shift, offs_n, n_ok, K, C, H, W, KW, KHW,
    sxc, sxh, sxw, swn, swk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr, VEC: tl.constexpr, WVEC: tl.constexpr, IN_NORM: tl.constexpr,
    PREC: tl.constexpr, W_PAD: tl.constexpr, STATS: tl.constexpr = True,
    THIRDS: tl.constexpr = False, HW_BITS: tl.constexpr = False, PAIR_KW: tl.constexpr = 0,
):
    """patches @ W.T for BLOCK_M rows and BLOCK_N columns; with IN_NORM
    (patches - shift) @ W.T, shift a (BLOCK_M,) value per row (``_row_shift``), and with
    STATS too the rows' sum and sum of squares of patches - shift over K (float32; zeros
    without). W_PAD: W's rows hold zeros past K up to a multiple of BLOCK_K (no k mask
    on its tiles). THIRDS (D = 3 * BLOCK_N, offs_n the first tile): also the next two
    column tiles from the same patch tiles, in acc1 and acc2 (zeros without). HW_BITS
    (with MASK_HW): the padding mask from ``_row_bits`` / ``_k_bits``. PAIR_KW (the
    kernel's width, 5 to 8; with HW_BITS and IN_NORM): the patches in the padded order
    of ``_gemm_pairs``."""
    if PAIR_KW > 0:
        acc, acc1, acc2, s1, s2 = _gemm_pairs(
            x_ptr, w_ptr, row_base, ih0, iw0, row_ok, shift, offs_n, n_ok, C, H, W, KHW // KW,
            sxc, sxh, swn, swk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_N, WVEC, PREC, STATS, THIRDS, PAIR_KW,
        )
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # the input norm's sums, element-wise per K step and reduced once after the loop
        s1 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        c, p, q = _k_digits(tl.arange(0, BLOCK_K), C, KW, KHW, PQC, True)
        dc, dp, dq = _k_deltas(C, KW, KHW, BLOCK_K, PQC)
        rbits = _row_bits(ih0, iw0, row_ok, H, W) if HW_BITS else row_ok.to(tl.int32)
        # whole K steps without k masks, then the partial one (K not a multiple of BLOCK_K)
        for k0 in range(0, K - K % BLOCK_K, BLOCK_K):
            acc, acc1, acc2, s1, s2 = _k_step(
                acc, acc1, acc2, s1, s2, k0, c, p, q, x_ptr, w_ptr, row_base, ih0, iw0, row_ok,
                rbits, shift, offs_n, n_ok, K, H, W, sxc, sxh, sxw, swn, swk, BLOCK_N, BLOCK_K,
                MASK_HW, EVEN_M, EVEN_N, True, VEC, WVEC, IN_NORM, PREC, W_PAD, STATS, THIRDS, HW_BITS,
            )
            c, p, q = _k_advance(c, p, q, dc, dp, dq, C, KW, KHW, PQC)
        if not EVEN_K:
            acc, acc1, acc2, s1, s2 = _k_step(
                acc, acc1, acc2, s1, s2, K - K % BLOCK_K, c, p, q, x_ptr, w_ptr, row_base, ih0, iw0,
                row_ok, rbits, shift, offs_n, n_ok, K, H, W, sxc, sxh, sxw, swn, swk, BLOCK_N, BLOCK_K,
                MASK_HW, EVEN_M, EVEN_N, False, VEC, WVEC, IN_NORM, PREC, W_PAD, STATS, THIRDS, HW_BITS,
            )
        s1 = tl.sum(s1, axis=1)
        s2 = tl.sum(s2, axis=1)
    return acc, acc1, acc2, s1, s2


@triton.jit
def _k_step(
    acc, acc1, acc2, s1, s2, k0, c, p, q, x_ptr, w_ptr, row_base, ih0, iw0, row_ok, rbits,
    shift, offs_n, n_ok, K, H, W, sxc, sxh, sxw, swn, swk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, FULL_K: tl.constexpr, VEC: tl.constexpr, WVEC: tl.constexpr,
    IN_NORM: tl.constexpr, PREC: tl.constexpr, W_PAD: tl.constexpr, STATS: tl.constexpr,
    THIRDS: tl.constexpr, HW_BITS: tl.constexpr,
):
    """One K step of ``_gemm_rows`` at k0, whose k digits are (c, p, q); FULL_K: every
    k of the step is below K (no k masks); rbits: ``_row_bits`` with HW_BITS."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    if MASK_HW and HW_BITS:
        kbits = _k_bits(p, q, k_ok, FULL_K)
        inside = (rbits[:, None] & kbits[None, :]) == kbits[None, :]
        col = c * sxc + p * sxh + q * sxw
        row_ptrs = x_ptr + row_base
        a = tl.load(_hint(row_ptrs[:, None], col[None, :], 1, VEC), mask=inside, other=0.0)
    else:
        a = _patch_tile(
            x_ptr, row_base, ih0, iw0, row_ok, c, p, q, k_ok, H, W, sxc, sxh, sxw,
            MASK_HW, EVEN_M, FULL_K, VEC,
        )
    w_ptrs = _hint(w_ptr, offs_k[:, None] * swk + offs_n[None, :] * swn, WVEC, 1)  # W.T tile
    b = _w_tile(w_ptrs, k_ok, n_ok, FULL_K, EVEN_N, W_PAD, WVEC)
    if IN_NORM:
        # around the shift: no cancellation of large means in the sums or the dot
        af = a.to(tl.float32) - shift[:, None]
        if not FULL_K:
            af = tl.where(k_ok[None, :], af, 0.0)
        if STATS:
            s1 += af
            s2 += af * af
        a = af.to(a.dtype)
    acc = tl.dot(a, b, acc, input_precision=PREC)
    if THIRDS:  # every column is in range (D = 3 * BLOCK_N)
        b = _w_tile(w_ptrs + BLOCK_N * swn, k_ok, n_ok, FULL_K, EVEN_N, W_PAD, WVEC)
        acc1 = tl.dot(a, b, acc1, input_precision=PREC)
        b = _w_tile(w_ptrs + 2 * BLOCK_N * swn, k_ok, n_ok, FULL_K, EVEN_N, W_PAD, WVEC)
        acc2 = tl.dot(a, b, acc2, input_precision=PREC)
    return acc, acc1, acc2, s1, s2


@triton.jit
def _gemm_pairs(
    x_ptr, w_ptr, row_base, ih0, iw0, row_ok, shift, offs_n, n_ok, C, H, W, KH, sxc, sxh, swn, swk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
    WVEC: tl.constexpr, PREC: tl.constexpr, STATS: tl.constexpr, THIRDS: tl.constexpr,
    KWIN: tl.constexpr,
):
    """``_gemm_rows`` with the input norm and padding for 2-byte images whose window rows
    start at even offsets (even strides, column stride 1, even horizontal stride and
    padding, even W: the launcher's PAIR_KW): k = (c * KH + ky) * 8 + kx, each window row
    padded from KWIN to 8 columns (W' is zero there, ``_prep_kernel``'s PAIRS), a K step
    is BLOCK_K // 8 window rows. A thread loads one patch row's window row as four 4-byte
    pixel pairs (a pair is inside or outside the image as a whole: even starts, even W)
    from one address per step; the pairs' column masks are per row (loop-invariant), a
    step adds one row bit per window row (``_row_bits``). Padded columns add nothing to
    the sums (their differences are zero) nor to the GEMM (zero weights)."""
    NR: tl.constexpr = BLOCK_K // 8  # window rows per K step
    # with THIRDS the first two column tiles as one 2 * BLOCK_N tile: two wgmma a step,
    # not three (each copies the A operand's registers and waits on its own)
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N if THIRDS else BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_M, NR), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M, NR), dtype=tl.float32)
    rbits = _row_bits(ih0, iw0, row_ok, H, W)
    # each pair's row bits (bits 0-14), zero where the pair (pixels iw0 + 2i, + 2i + 1)
    # is outside the image (its first pixel is): a step tests one word per pair
    ok0 = tl.where((rbits & (1 << 16)) != 0, rbits, 0)
    ok1 = tl.where((rbits & (1 << 18)) != 0, rbits, 0)
    ok2 = tl.where((rbits & (1 << 20)) != 0, rbits, 0)
    ok3 = tl.where((rbits & (1 << 22)) != 0, rbits, 0)
    rows = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (row_base >> 1)  # words
    sxc2 = sxc >> 1
    sxh2 = sxh >> 1
    # the step's window rows (c, ky) as their word offsets and ky (the row bit), advanced
    # by NR window rows a step: a carry-add (ky wraps at KH into the next channel)
    r = tl.arange(0, NR)
    c, ky = _divmod_small(r, KH)
    off = c * sxc2 + ky * sxh2
    dc, dky = _divmod_small(C * 0 + NR, KH)
    doff = dc * sxc2 + dky * sxh2
    wrap = sxc2 - KH * sxh2
    if THIRDS:  # every column is in range (D = 3 * BLOCK_N)
        offs_w = tl.arange(0, 2 * BLOCK_N)
    else:
        offs_w = offs_n
    NWR = C * KH  # window rows
    for k0 in range(0, NWR // NR * BLOCK_K, BLOCK_K):
        a, s1, s2 = _pair_tile(
            s1, s2, off, ky, r, rows, ok0, ok1, ok2, ok3, shift, NWR % NR, BLOCK_K, STATS, True, KWIN,
            w_ptr.dtype.element_ty,
        )
        acc, acc2 = _pair_dots(
            acc, acc2, a, k0, w_ptr, offs_w, n_ok, swn, swk, BLOCK_N, BLOCK_K, EVEN_N, WVEC, PREC, THIRDS
        )
        ky += dky
        off += doff
        cy = ky >= KH
        ky = tl.where(cy, ky - KH, ky)
        off = tl.where(cy, off + wrap, off)
    if NWR % NR != 0:  # the last window rows, r < NWR % NR
        a, s1, s2 = _pair_tile(
            s1, s2, off, ky, r, rows, ok0, ok1, ok2, ok3, shift, NWR % NR, BLOCK_K, STATS, False, KWIN,
            w_ptr.dtype.element_ty,
        )
        acc, acc2 = _pair_dots(
            acc, acc2, a, NWR // NR * BLOCK_K, w_ptr, offs_w, n_ok, swn, swk, BLOCK_N, BLOCK_K, EVEN_N,
            WVEC, PREC, THIRDS,
        )
    if THIRDS:  # (BLOCK_M, 2 * BLOCK_N) -> its two column tiles
        acc, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    else:
        acc1 = acc2
    return acc, acc1, acc2, tl.sum(s1, axis=1), tl.sum(s2, axis=1)


@triton.jit
def _pair_dots(
    acc, acc2, a, k0, w_ptr, offs_w, n_ok, swn, swk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr, WVEC: tl.constexpr, PREC: tl.constexpr, THIRDS: tl.constexpr,
):
    """acc += a @ W'.T[k0:k0 + BLOCK_K, offs_w] (W' zero past its padded K); with THIRDS
    also acc2 from the third column tile."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w_ptrs = _hint(w_ptr, offs_k[:, None] * swk + offs_w[None, :] * swn, WVEC, 1)  # W.T tile
    if THIRDS:
        acc = tl.dot(a, tl.load(w_ptrs), acc, input_precision=PREC)
        w2 = _hint(w_ptr, offs_k[:, None] * swk + (2 * BLOCK_N + tl.arange(0, BLOCK_N))[None, :] * swn, WVEC, 1)
        acc2 = tl.dot(a, tl.load(w2), acc2, input_precision=PREC)
    else:
        acc = tl.dot(a, _w_tile(w_ptrs, offs_k, n_ok, True, EVEN_N, True, WVEC), acc, input_precision=PREC)
    return acc, acc2


@triton.jit
def _pair_diff(word, shift, DT: tl.constexpr):
    """A word's two pixels (low half first) as float32, less the row's shift."""
    if DT == tl.bfloat16:  # a bfloat16 is the high half of its float32
        lo = (word << 16).to(tl.float32, bitcast=True)
        hi = (word & -65536).to(tl.float32, bitcast=True)
    else:
        lo = word.to(tl.int16).to(DT, bitcast=True).to(tl.float32)
        hi = (word >> 16).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
    return lo - shift[:, None], hi - shift[:, None]


@triton.jit
def _pair_tile(
    s1, s2, off, ky, r, rows, ok0, ok1, ok2, ok3, shift, n_live, BLOCK_K: tl.constexpr,
    STATS: tl.constexpr, FULL: tl.constexpr, KWIN: tl.constexpr, DT: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_K) A tile of one K step of ``_gemm_pairs`` (patch less shift,
    in DT) and the sums with it: window rows at word offsets off (NR,), their kernel rows
    ky; FULL: all NR are window rows, else the first n_live."""
    kbit = 1 << ky
    if not FULL:
        kbit = tl.where(r < n_live, kbit, 0)
    kb = kbit[None, :]
    ptrs = rows[:, None] + off[None, :]  # (BLOCK_M, NR) word pointers
    e0, e1 = _pair_diff(tl.load(ptrs, mask=(ok0[:, None] & kb) != 0, other=0), shift, DT)
    e2, e3 = _pair_diff(tl.load(ptrs + 1, mask=(ok1[:, None] & kb) != 0, other=0), shift, DT)
    e4, e5 = _pair_diff(tl.load(ptrs + 2, mask=(ok2[:, None] & kb) != 0, other=0), shift, DT)
    e6, e7 = _pair_diff(tl.load(ptrs + 3, mask=(ok3[:, None] & kb) != 0, other=0), shift, DT)
    # the padded columns (kx >= KWIN): not the pixels past the window, which may be in
    # no window at all (a NaN there would reach the GEMM through its zero weights)
    # (the A tile repeats the last window column there, whose weights are zero; the
    # sums skip them)
    if KWIN < 6:
        e5 = e4
    if KWIN < 7:
        e6 = e5
    if KWIN < 8:
        e7 = e6
    if not FULL:  # window rows past C * KH
        live = (r < n_live)[None, :]
        e0 = tl.where(live, e0, 0.0)
        e1 = tl.where(live, e1, 0.0)
        e2 = tl.where(live, e2, 0.0)
        e3 = tl.where(live, e3, 0.0)
        e4 = tl.where(live, e4, 0.0)
        e5 = tl.where(live, e5, 0.0)
        e6 = tl.where(live, e6, 0.0)
        e7 = tl.where(live, e7, 0.0)
    if STATS:  # chains of adds and fused multiply-adds, without the zero columns
        s1 += e0
        s1 += e1
        s1 += e2
        s1 += e3
        s1 += e4
        s2 += e0 * e0
        s2 += e1 * e1
        s2 += e2 * e2
        s2 += e3 * e3
        s2 += e4 * e4
        if KWIN >= 6:
            s1 += e5
            s2 += e5 * e5
        if KWIN >= 7:
            s1 += e6
            s2 += e6 * e6
        if KWIN >= 8:
            s1 += e7
            s2 += e7 * e7
    # (BLOCK_M, NR, 8) in-thread, kx = 4 * i + 2 * j + t at [.., i, j, t] -> (BLOCK_M, BLOCK_K)
    a = tl.join(
        tl.join(tl.join(e0.to(DT), e4.to(DT)), tl.join(e2.to(DT), e6.to(DT))),
        tl.join(tl.join(e1.to(DT), e5.to(DT)), tl.join(e3.to(DT), e7.to(DT))),
    )
    a = tl.reshape(a, (a.shape[0], BLOCK_K))
    return a, s1, s2


@triton.jit
def _w_tile(w_ptrs, k_ok, n_ok, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, W_PAD: tl.constexpr, WVEC: tl.constexpr):
    """A (BLOCK_K, BLOCK_N) tile of W.T, zero past K and D."""
    if (EVEN_K or W_PAD) and EVEN_N:
        return tl.load(w_ptrs)
    elif EVEN_K or W_PAD:
        return tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
    else:
        return tl.load(w_ptrs, mask=_mask2(k_ok, n_ok, WVEC, 1), other=0.0)


@triton.jit
def _row_shift(x_ptr, row_base, ih0, iw0, row_ok, H, W, MASK_HW: tl.constexpr):
    """Each patch's first pixel (channel 0 at its top-left corner; 0 in the padding),
    float32: the input norm's sums and the folded GEMM are taken around it, so a large
    mean does not cancel (bright, flat patches)."""
    if MASK_HW:
        ok = row_ok & (ih0 >= 0) & (ih0 < H) & (iw0 >= 0) & (iw0 < W)
    else:
        ok = row_ok
    return tl.load(x_ptr + row_base, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _in_norm_stats(s1, s2, K, in_eps):
    """(mean of x - shift, rstd) from the sums of x - shift over K (1 / K once: each
    row's statistics cost a few multiplies and one reciprocal square root, where
    IEEE divisions cost a dozen instructions per row and layout)."""
    inv_k = 1.0 / tl.cast(K, tl.float32)
    mean_d = s1 * inv_k
    var = tl.maximum(s2 * inv_k - mean_d * mean_d, 0.0)
    return mean_d, tl.math.rsqrt(var + in_eps)


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
def _tile_out(
    acc, offs_n, n_ok, row_ok, mean_d, rstd, mean, m2, n0, colsum_ptr, shift_ptr, pos_rows, spd,
    dst_rows, sdd, out_ptr, IN_NORM: tl.constexpr, HAS_SHIFT: tl.constexpr,
    OUT_NORM: tl.constexpr, HAS_POS: tl.constexpr, OVEC: tl.constexpr,
):
    """One column tile of the first pass: the input norm's correction of the GEMM, the
    bias (and position embedding without an output norm) applied, the tile stored at
    dst_rows (BLOCK_M,) pointers, column stride sdd; returns the output norm's running
    (mean, M2) with the tile merged in (unchanged without an output norm)."""
    y = acc
    if IN_NORM:
        colsum = tl.load(colsum_ptr + offs_n, mask=n_ok, other=0.0)
        y = rstd[:, None] * (y - mean_d[:, None] * colsum[None, :])
    if HAS_SHIFT:
        y += tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = _mask2(row_ok, n_ok, 1, OVEC)
    if OUT_NORM:
        # the statistics of the tokens as stored (rounded to the output dtype), which
        # the second pass normalises: as eager's LayerNorm sees its Linear's output
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        mean, m2 = _chan_update(mean, m2, y, n_ok, n0)
    elif HAS_POS:
        pos = tl.load(_hint(pos_rows[:, None], offs_n[None, :] * spd, 1, OVEC), mask=mask, other=0.0)
        y += pos.to(tl.float32)
    tl.store(_hint(dst_rows[:, None], offs_n[None, :] * sdd, 1, OVEC), y.to(out_ptr.dtype.element_ty), mask=mask)
    return mean, m2


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, colsum_ptr, shift_ptr, ow_ptr, ob_ptr, pos_ptr, cls_ptr, out_ptr, stats_ptr,
    y_ptr, ostats_ptr, M, L, Wout, D, K, C, H, W, KW, KHW, SH, SW, PH, PW, P,
    sxb, sxc, sxh, sxw, swn, swk, spt, spd, scp, scd, sob, sot, sod,
    in_eps, out_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PQC: tl.constexpr, MASK_HW: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, IDX64: tl.constexpr, EVEN_N: tl.constexpr, WVEC: tl.constexpr,
    OVEC: tl.constexpr, W_PAD: tl.constexpr, IN_NORM: tl.constexpr, HAS_SHIFT: tl.constexpr,
    OUT_NORM: tl.constexpr, RCP_ROWS: tl.constexpr, FLAT_OUT: tl.constexpr,
    HAS_OW: tl.constexpr, HAS_OB: tl.constexpr, HAS_POS: tl.constexpr, POS_ALL: tl.constexpr,
    HAS_CLS: tl.constexpr, WRITE_STATS: tl.constexpr, SAVE_Y: tl.constexpr, PREC: tl.constexpr,
    THIRDS: tl.constexpr, HW_BITS: tl.constexpr, PAIR_KW: tl.constexpr,
):
    """out[b, P + l, n] for a (BLOCK_M, BLOCK_N) tile, or BLOCK_M whole rows with OUT_NORM.

    WRITE_STATS: stats[m] = (mu, rstd) of the input norm (float32, (M, 2)). SAVE_Y (with
    OUT_NORM): the first pass stores the pre-norm tokens in y (M, D) (out's dtype)
    instead of out, the second reads them there, and ostats[m] = (mean, rstd) of the
    output norm (float32, (M, 2)): what the backward reads.

    Grid: (cdiv(M, BLOCK_M) * cdiv(D, BLOCK_N),) with the column tile fastest
    (the A rows stay in L2 across columns); (cdiv(M, BLOCK_M),) with OUT_NORM or
    THIRDS (D = 3 * BLOCK_N: the three column tiles of a row block share its patch
    tiles, no power-of-two tile padded past D).
    """
    pid = tl.program_id(0)
    if OUT_NORM:
        pid_m = pid
        n_start = 0
        n_end = D
    elif THIRDS:  # one program per BLOCK_M rows, D = 3 * BLOCK_N columns
        pid_m = pid
        n_start = 0
        n_end = D
    else:
        num_n = tl.cdiv(D, BLOCK_N)
        pid_m = pid // num_n
        n_start = (pid % num_n) * BLOCK_N
        n_end = n_start + BLOCK_N
    offs_m, row_ok, b, l, ih0, iw0, row_base = _patch_rows(
        pid_m, M, L, Wout, SH, SW, PH, PW, sxb, sxh, sxw, BLOCK_M, IDX64, RCP_ROWS
    )
    x_base = row_base
    if FLAT_OUT:  # no prefix tokens, images' rows back to back: row m at m * sot
        out_rows = out_ptr + _idx(offs_m, IDX64) * sot  # (BLOCK_M,) pointers
    else:
        out_rows = out_ptr + _idx(b, IDX64) * sob + (P + l) * sot
    if SAVE_Y:  # the first pass's rows: y (M, D), contiguous
        y_rows = y_ptr + _idx(offs_m, IDX64) * D
        syd = 1
    else:
        y_rows = out_rows
        syd = sod
    if POS_ALL:
        pos_rows = pos_ptr + (P + l) * spt
    else:
        pos_rows = pos_ptr + l * spt
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mean_d = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if IN_NORM:
        shift = _row_shift(x_ptr, x_base, ih0, iw0, row_ok, H, W, MASK_HW)
    else:
        shift = mean_d
    # the first column tile (the only one without an output norm) takes the input
    # norm's statistics of the rows; the others reuse them
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    acc, acc1, acc2, s1, s2 = _gemm_rows(
        x_ptr, w_ptr, x_base, ih0, iw0, row_ok, shift, offs_n, n_ok, K, C, H, W, KW, KHW,
        sxc, sxh, sxw, swn, swk, BLOCK_M, BLOCK_N, BLOCK_K, PQC, MASK_HW, EVEN_M, EVEN_N,
        EVEN_K, VEC, WVEC, IN_NORM, PREC, W_PAD, True, THIRDS, HW_BITS, PAIR_KW,
    )
    if IN_NORM:
        mean_d, rstd = _in_norm_stats(s1, s2, K, in_eps)
    if THIRDS:  # the row block's three column tiles t (no output norm): acc, acc1, acc2
        for t in tl.static_range(3):
            _tile_out(
                (acc, acc1, acc2)[t], offs_n + t * BLOCK_N, n_ok, row_ok, mean_d, rstd, mean, m2, t * BLOCK_N,
                colsum_ptr, shift_ptr, pos_rows, spd, out_rows, sod, out_ptr, IN_NORM, HAS_SHIFT, OUT_NORM,
                HAS_POS, OVEC,
            )
    else:
        mean, m2 = _tile_out(
            acc, offs_n, n_ok, row_ok, mean_d, rstd, mean, m2, n_start, colsum_ptr, shift_ptr,
            pos_rows, spd, y_rows if OUT_NORM else out_rows, syd if OUT_NORM else sod, out_ptr,
            IN_NORM, HAS_SHIFT, OUT_NORM, HAS_POS, OVEC,
        )
    if OUT_NORM:
        for n1 in range(n_start + BLOCK_N, n_end, BLOCK_N):
            offs_n = n1 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < D
            acc, acc1, acc2, s1, s2 = _gemm_rows(
                x_ptr, w_ptr, x_base, ih0, iw0, row_ok, shift, offs_n, n_ok, K, C, H, W, KW, KHW,
                sxc, sxh, sxw, swn, swk, BLOCK_M, BLOCK_N, BLOCK_K, PQC, MASK_HW, EVEN_M, EVEN_N,
                EVEN_K, VEC, WVEC, IN_NORM, PREC, W_PAD, False, False, HW_BITS, PAIR_KW,
            )
            mean, m2 = _tile_out(
                acc, offs_n, n_ok, row_ok, mean_d, rstd, mean, m2, n1, colsum_ptr, shift_ptr,
                pos_rows, spd, y_rows, syd, out_ptr, IN_NORM, HAS_SHIFT, OUT_NORM, HAS_POS, OVEC,
            )
    if OUT_NORM:
        # second pass over the row block: normalise what this program wrote
        tl.debug_barrier()
        rstd_o = 1.0 / tl.sqrt(m2 / D + out_eps)
        for n0 in range(0, D, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < D
            mask = _mask2(row_ok, n_ok, 1, OVEC)
            y_ptrs = _hint(y_rows[:, None], offs_n[None, :] * syd, 1, OVEC)
            y = (tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd_o[:, None]
            if HAS_OW:
                y *= tl.load(ow_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_OB:
                y += tl.load(ob_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_POS:
                pos_ptrs = _hint(pos_rows[:, None], offs_n[None, :] * spd, 1, OVEC)
                y += tl.load(pos_ptrs, mask=mask, other=0.0).to(tl.float32)
            ptrs = _hint(out_rows[:, None], offs_n[None, :] * sod, 1, OVEC)
            tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE_Y:
            tl.store(ostats_ptr + offs_m * 2, mean, mask=row_ok)
            tl.store(ostats_ptr + offs_m * 2 + 1, rstd_o, mask=row_ok)
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
    if WRITE_STATS:  # by the rows' first column tile (the others hold the same values)
        stats_ok = row_ok
        if not OUT_NORM:
            stats_ok = row_ok & (offs_m * 0 + n_start == 0)
        tl.store(stats_ptr + offs_m * 2, shift + mean_d, mask=stats_ok)
        tl.store(stats_ptr + offs_m * 2 + 1, rstd, mask=stats_ok)


@triton.jit
def _prep_kernel(
    w_ptr, g_ptr, b_ptr, bias_ptr, wk_ptr, colsum_ptr, shift_ptr, wplain_ptr,
    D, K, KP, C, KHW, swn, swk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SRC_PQC: tl.constexpr, DST_PQC: tl.constexpr,
    HAS_G: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PLAIN: tl.constexpr,
    PAIR_KW: tl.constexpr = 0, PKP: tl.constexpr = 0,
):
    """The input norm folded into the weight, in the kernel's patch order (one launch):
    wk[n, k] = W[n, src(k)] * g[src(k)] (rounded to W's dtype), colsum[n] = sum_k wk[n, k],
    shift[n] = sum_k W[n, k] * in_bias[k] + bias[n] (float32); with WRITE_PLAIN also
    wplain[n, k] = W[n, src(k)] (the backward's dy @ W). src(k): the column of
    kernel-order k in the caller's order. wk and wplain have rows of KP >= K columns,
    zero past K (aligned rows: the GEMMs load them without a k mask). PAIR_KW (the
    kernel's width; "cpq" kernel order): wk in ``_gemm_pairs``' padded order instead,
    wk[n, (c * kh + ky) * 8 + kx] for kx < PAIR_KW, zero elsewhere, rows of PKP columns
    (wplain keeps the plain kernel order). Grid: (cdiv(D, BLOCK_N),)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    shift = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PAIR_KW > 0:
        # the padded order: kx = k % 8, window row k // 8 = c * kh + ky
        for k0 in range(0, PKP, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kx = offs_k % 8
            k_ok = (kx < PAIR_KW) & (offs_k < K // PAIR_KW * 8)
            kcpq = (offs_k // 8) * PAIR_KW + kx  # (c, p, q) order
            if SRC_PQC:  # caller (p, q, c)
                src = (kcpq % KHW) * C + kcpq // KHW
            else:
                src = kcpq
            src = tl.where(k_ok, src, 0)
            mask = n_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + offs_n[:, None] * swn + src[None, :] * swk, mask=mask, other=0.0)
            wg = w
            if HAS_G:
                gk = tl.load(g_ptr + src, mask=k_ok, other=0.0).to(tl.float32)
                wg = (w.to(tl.float32) * gk[None, :]).to(w.dtype)
            tl.store(wk_ptr + offs_n[:, None] * PKP + offs_k[None, :], wg, mask=n_ok[:, None])
            colsum += tl.sum(wg.to(tl.float32), axis=1)
            if HAS_B:
                bk = tl.load(b_ptr + src, mask=k_ok, other=0.0).to(tl.float32)
                shift += tl.sum(w.to(tl.float32) * bk[None, :], axis=1)
    for k0 in range(0, KP if PAIR_KW == 0 or WRITE_PLAIN else 0, BLOCK_K):
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
        row_mask = n_ok[:, None] & (offs_k < KP)[None, :]  # zeros past K
        if WRITE_PLAIN:
            tl.store(wplain_ptr + offs_n[:, None] * KP + offs_k[None, :], w, mask=row_mask)
        if PAIR_KW == 0:
            wg = w
            if HAS_G:
                gk = tl.load(g_ptr + src, mask=k_ok, other=0.0).to(tl.float32)
                wg = (w.to(tl.float32) * gk[None, :]).to(w.dtype)
            tl.store(wk_ptr + offs_n[:, None] * KP + offs_k[None, :], wg, mask=row_mask)
            colsum += tl.sum(wg.to(tl.float32), axis=1)
            if HAS_B:
                bk = tl.load(b_ptr + src, mask=k_ok, other=0.0).to(tl.float32)
                shift += tl.sum(w.to(tl.float32) * bk[None, :], axis=1)
    if HAS_BIAS:
        shift += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(colsum_ptr + offs_n, colsum, mask=n_ok)
    tl.store(shift_ptr + offs_n, shift, mask=n_ok)
