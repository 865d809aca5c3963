"""Triton ``patch_embed``: convolution as a GEMM whose A operand is gathered from
the image inside the loads (no unfolded tensor in memory). This module holds the
geometry, the block-size heuristics and the launchers; the kernels are in
``_patch_embed_fwd.py`` (forward, and the patch gathering both directions share)
and ``_patch_embed_bwd.py``.

    tokens[b, l, :] = out_norm(in_norm(patch(b, l)) @ weight.T + bias) (+ pos)
    out = cat(cls (+ pos[:P]), tokens)                       # (B, P + L, D)

The input layer norm is folded into the GEMM: with g, beta its affine and
W' = W * g (made per call by one small launch, ``_prep_kernel``, which also
permutes the columns to the kernel's patch order),

    in_norm(x) @ W.T = rstd * ((x - s) @ W'.T - (mu - s) * rowsum(W')) + beta @ W.T

so the kernel multiplies the patch less a shift s, its first pixel, and takes mu,
rstd from the sum and sum of squares of x - s (float32) over the same loaded tiles:
around the shift a large mean (bright, flat patches) does not cancel. The output layer norm, bias,
position embedding and class token run in the epilogue; with an output norm one
program owns BLOCK_M whole rows and makes two passes over D (statistics, then
normalise what it wrote: the same rounding eager's Linear -> LayerNorm has).

The kernel reads patches in the order that is contiguous in memory ("cpq" for
NCHW images, "pqc" for channels_last); the weight and the input norm's affine
(D x K, small) are permuted to it when the caller's patch_order differs. With the
input norm, 2-byte NCHW images whose windows start at even columns (T2T's 7 / 4 / 2)
are gathered as 4-byte pixel pairs, each window row padded to 8 columns: the prep
launch writes W' in that padded order (zero columns) for the forward, the backward
keeps the plain kernel order (``_pair_kw``, ``_gemm_pairs``).

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
                    patch_order, in_eps, out_eps, has_in_norm, has_out_norm, grad_mask,
                    saved=())
        -> (d_weight, d_bias, d_in_weight, d_in_bias, d_out_weight, d_out_bias,
            d_pos_embed, d_cls_token)

      grad_out    (B, P + L, D), any strides
      grad_mask   list[bool] of 8, the results in that order
      saved       what ``patch_embed_fwd_saving`` wrote, or empty (0,) tensors / ()
      each result has its input's shape and dtype, or is an empty (0,) tensor where
      the input is None or its grad_mask entry is False. No image gradient.

The forward of a training step is ``patch_embed_fwd_saving`` (the same arguments):
it also writes what the backward reads (``saved_layout``): the pre-output-norm tokens
in the images' dtype (the statistics pass stores them there instead of in out; eager's
LayerNorm saves its input so too) with the output norm's (mean, rstd), the input
norm's (mu, rstd) and the plain W in kernel order from the prep launch. The inference
forward writes none of them.

Backward: with nothing saved (a caller that passes none) the patch rows' pre-norm
tokens are recomputed in float32 with the forward kernel after a prep launch (with
an output norm) or the input norm's statistics by ``_patch_stats_kernel`` (without);
the output norm's backward runs row-wise (``_out_norm_bwd_kernel``), dW = dy.T @ in_norm(patches) is a split-M GEMM that
gathers the patches again (``_dw_kernel``), and the input norm's affine grads
come from dxn = dy @ W with the normalised patch in the epilogue
(``_dxn_kernel``, split along the rows like dW). The bias gradient is the output
norm's partials or, without one, an extra column tile of dW that sums dy. When D
fits one column tile (T2T's 192) and the target is sm_90 or later, one kernel
(``_dw_dxn_kernel``) does dW, the bias (a column of ones at k = K) and dxn from each
patch tile it gathers, on row blocks that are 8 x 8 tiles of the patch grid. One last
launch (``_fold_kernel``) sums every float32 partial over its row splits and
grad_out over the batch (positions, prefix tokens) and writes each gradient in its
dtype: no torch operations, a fixed summation order. The row splits fill the SMs
in whole waves (``_row_split``).

Block sizes come from ``fwd_config`` / ``bwd_config``: a small deterministic
heuristic of the shape (a GPU tuning pass may change them); tests monkeypatch
them to force several tiles through the interpreter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import triton

from vitkernels.ops._dispatch import triton_interpret
from vitkernels.triton._common import (
    SHORT,
    Launch,
    TensorFactory,
    alloc,
    cdiv,
    dot_precision,
    launch,
    sm_count,
    target_arch,
)
from vitkernels.triton._patch_embed_bwd import (
    _dw_dxn_kernel,
    _dw_kernel,
    _dxn_kernel,
    _fold_kernel,
    _out_norm_bwd_kernel,
    _patch_stats_kernel,
)
from vitkernels.triton._patch_embed_fwd import _patch_embed_fwd_kernel, _prep_kernel
from vitkernels.workloads import PatchEmbedShape

__all__ = [
    "bwd_config", "fwd_config", "patch_embed_bwd", "patch_embed_fwd", "patch_embed_fwd_saving", "record_calls",
    "saved_layout",
]

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


def _dy_rows_async(grad_out: torch.Tensor, has_out_norm: bool, D: int) -> bool:
    """Whether the rows of the dy the dW/dxn kernels read (grad_out, or the output
    norm's backward's own contiguous buffer) are 16-byte aligned runs that Triton can
    copy to shared memory asynchronously. Where 16-bit rows are not, triton 3.9 builds
    the fused kernel's dW dot (``tl.trans(dy)``) from the loaded tile stored to shared
    memory, and gives sm_90a's wgmma its transposed view as the A operand: the pattern
    that made the performer's forward wrong on an H200 (bench/NOTES.md, 2026-12-04;
    ``_aot.transposed_register_a`` finds it). Loading dy^T from memory for that dot
    instead spilled 32-144 B (D 192, 255 registers) and taking dxn's operand from it
    moved the pattern to dxn's dot; ``_dw_kernel``, which loads dy^T itself, and
    ``_dxn_kernel`` have neither, so such launches take those two."""
    if grad_out.element_size() != 2:
        return True
    if has_out_norm:
        return D % 8 == 0
    return _run_vec(grad_out, -1, D) == 8


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
    thirds: bool = False  # D = 3 * block_n, one program per row block takes all three tiles


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def fwd_config(
    M: int, D: int, K: int, dtype: torch.dtype, in_norm: bool, out_norm: bool, interpret: bool,
    arch: int = 90, aligned: bool = True,
) -> FwdConfig:
    """Block sizes of the forward kernel (and of the backward's recompute) for compute
    capability ``arch``; aligned: every tensor it reads or writes starts 16-byte aligned."""
    if interpret:  # K tiles as in bwd_config
        return FwdConfig(32, _pow2_clamp(D, 16, 64), 32 if K <= 2048 else 128, 4, 1)
    wide = dtype == torch.float32
    # sm_80 with the input norm: K steps of 32 (64 spilled 16 B at D 192, T2T's second
    # soft split, once the norm's sums were taken around a shift). float32: K steps of
    # 16 (its dots are FMA loops whose operands, a K step wide, sit in registers: 32
    # spilled 12-84 B at T2T-3, P2 and a one-token shape, misaligned or on triton 3.6)
    block_k = 16 if wide else 32 if K < 256 or (in_norm and arch < 90) else 64
    stages = 2 if wide else 3
    # Register budgets were checked ahead of time with triton 3.9 (CI) and 3.6 (the GPU
    # machine): 3.6 spilled 944 B at 128 x 128 x 64 / 8 warps (P1) and 76 B at
    # 64 x 128 / 8 warps with the output norm (P2); the tiles below spill on neither
    # (32 x 128 x 64 / 4 warps spilled 16 B on sm_80 with 3.9: K steps of 32 there).
    if out_norm:  # one program per BLOCK_M whole rows
        # sm_90: 64 rows on one warpgroup (wgmma; P2 fwd 184 -> 121 us, estimate); sm_80,
        # float32 and misaligned tensors keep 32 (64 spilled 32 B on sm_80 with triton 3.6,
        # 12 B on sm_90a with misaligned float16 tensors and triton 3.9)
        rows = 64 if arch >= 90 and aligned and not wide else 32
        # sm_80: 2 stages (3 spilled 8-16 B for bfloat16 once the first column tile
        # was peeled off to take the input norm's sums alone)
        return FwdConfig(rows, _pow2_clamp(D, 32, 128), min(block_k, 32), 4, stages if arch >= 90 else 2)
    if D == 192 and K < 256 and not wide:
        # T2T's first soft split (K 147, D 192) as three 64-column tiles of one program
        # (each patch gathered once): a 256-column tile spent a quarter of its MMA and
        # epilogue on padding. One warp group and K steps of 16: each thread's patch tile
        # holds half as many rows, whose addresses, bounds and sums are per row and
        # thread (P3 fwd 235 -> 175 us, estimate). Larger K (T2T's second split, K 576)
        # keeps the 256-column tile: not estimated.
        return FwdConfig(64, 64, 16, 4, 3, thirds=True)
    if D <= 256 and not wide:  # one column tile: each patch is gathered once
        block_n = _pow2_clamp(D, 32, 256)
        return FwdConfig(64 if block_n == 256 else 128, block_n, block_k, 8, stages)
    if not in_norm and not wide:  # P1: 64 x 256 tiles, as many MACs per tile as 128 x 128
        return FwdConfig(64, _pow2_clamp(D, 32, 256), 32, 8, stages)
    # the input norm's statistics take registers: 64 rows then (no spills for sm_80 / sm_90a);
    # float32's FMA dot too (128 rows spilled 76 B at P1 on sm_90a; 64: 210 registers)
    return FwdConfig(64 if in_norm or wide else 128, _pow2_clamp(D, 32, 128), block_k, 8, stages)


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    block_m: int  # rows per step of the dW reduction, rows per program elsewhere
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split: int  # programs along M for dW


def bwd_config(
    M: int, D: int, K: int, dtype: torch.dtype, interpret: bool, sms: int, pqc_in_norm: bool = False
) -> BwdConfig:
    """Block sizes of the backward kernels and the dW split along M (pqc_in_norm: the
    kernels gather "pqc" patches and normalise them)."""
    if interpret:
        # wider K tiles only where K is large (T2T's last soft split, K = 11907): the
        # interpreter's time goes per program, and small shapes keep several K tiles
        block_k = 32 if K <= 2048 else 128
        block_m, block_n, warps, stages = 32, _pow2_clamp(D, 16, 32), 4, 1
    else:
        wide = dtype == torch.float32
        # 64-wide K steps spilled 4-12 B in dW with triton 3.6 on sm_80 for "pqc" patches
        # with an input norm (channels-last P2, T2T-2): 32 there
        narrow = wide or K < 256 or pqc_in_norm
        block_m, block_n, block_k = 64, _pow2_clamp(D, 32, 128), 32 if narrow else 64
        # float32: one stage (two spilled 240-470 B in dW with the input norm, whatever
        # the tile: the FMA dot's operands are register-resident)
        warps, stages = 8, 1 if wide else 3
    tiles = triton.cdiv(D, block_n) * triton.cdiv(K, block_k)
    m_blocks = triton.cdiv(M, block_m)
    split = max(1, min(m_blocks, triton.cdiv(4 * sms, tiles))) if interpret else _row_split(tiles, m_blocks, sms)
    return BwdConfig(block_m, block_n, block_k, warps, stages, split)


_W_PAD = 64  # the folded weight's rows padded to a multiple of this many columns (K steps <= 64)
_PER_SM = 3  # resident programs per SM of the dW and dxn kernels (sm_90a, as compiled)
_FUSED_PER_SM = 1  # of the fused dW + dxn kernel
_FUSED_MAX_N = 256  # widest column tile (D padded to a power of 2) the fused kernel takes
_TILE_W = 8  # patch-grid columns of the fused kernel's and the stats kernel's row blocks (at most)


def _row_split(tiles: int, m_blocks: int, sms: int, per_sm: int = _PER_SM) -> int:
    """Programs along the rows for a reduction over m_blocks row blocks whose output
    has `tiles` tiles: the fewest splits that minimise (waves) x (row blocks per
    program), so the last wave is not a thin tail (fewer splits: smaller partials)."""
    slots = sms * per_sm

    def cost(s: int) -> int:
        return triton.cdiv(tiles * s, slots) * triton.cdiv(m_blocks, s)

    candidates = range(1, min(m_blocks, triton.cdiv(8 * slots, tiles)) + 1)  # up to 8 waves
    best = min(cost(s) for s in candidates)
    return next(s for s in candidates if cost(s) <= best * 1.02)


# ----------------------------------------------------------------------------
# launches


def _x_args(images: torch.Tensor, g: _Geometry) -> tuple[list, list]:
    """(C, H, W, KW, KHW, SH, SW, PH, PW) and the image strides, as every kernel takes them."""
    return [g.C, g.H, g.W, g.kw, g.kh * g.kw, g.sh, g.sw, g.ph, g.pw], list(images.stride())


# integers a float reciprocal divides exactly (``_patch_rows``): Triton's float32 division
# (div.full.f32) is within 2 ulp, so floor((x + 0.5) * (1 / d)) is x // d below 2^20
_RCP_ROWS_LIMIT = 1 << 20


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
    return f"{SHORT[dtype]},{order},k{g.kh}s{g.sh}p{g.ph},C{g.C},D{D}"


@dataclasses.dataclass
class _Prepared:
    """Weights in the kernel's patch order, with the input norm folded in."""

    g: _Geometry
    order: str
    w: torch.Tensor  # (D, K) kernel order (W * in_weight with an input norm)
    colsum: torch.Tensor | None  # (D,) float32 rowsum(W') with an input norm
    shift: torch.Tensor | None  # (D,) bias, or float32 in_bias @ W.T + bias
    w_plain: torch.Tensor | None  # (D, K) W in kernel order (None: not asked for)
    w_pad: bool  # w's rows continue with zeros up to a multiple of _W_PAD columns
    pair_kw: int = 0  # w in the forward's padded pair order (``_pair_kw``), else 0


def _pair_kw(images: torch.Tensor, g: _Geometry, order: str) -> int:
    """The kernel width when the forward can gather the patches as 4-byte pixel pairs
    (``_gemm_pairs``, with the input norm): 2-byte "cpq" images with unit column stride,
    even strides and base, window rows that start at even columns (even horizontal
    stride and padding) in an image of even width (a pair is inside or outside it as a
    whole), padding (the row bits of ``_row_bits``: kernels of at most 15 rows) and
    5 to 8 kernel columns (padded to 8); else 0."""
    ok = (
        images.element_size() == 2
        and order == "cpq"
        and g.mask_hw
        and g.kh <= 15
        and 5 <= g.kw <= 8
        and images.stride(3) == 1
        and all(st % 2 == 0 for st in images.stride()[:3])
        and _aligned(images, 2)
        and g.sw % 2 == 0
        and g.pw % 2 == 0
        and g.W % 2 == 0
    )
    return g.kw if ok else 0


def _prepare(
    images, weight, bias, in_weight, in_bias, kernel_size, stride, padding, patch_order,
    has_in_norm, interpret, plain: bool = False,
) -> _Prepared:
    """plain: also W itself in kernel order (written by the prep launch if it runs)."""
    g = _geometry(images, kernel_size, stride, padding)
    order = _kernel_order(images, patch_order)
    if not has_in_norm:
        wk = _reorder(weight, g, patch_order, order)
        return _Prepared(g, order, wk, None, bias, wk, False)
    D, K = weight.shape
    dev = weight.device
    # rows padded to _W_PAD columns, zeros past K: aligned rows, no k mask on W's tiles
    KP = cdiv(K, _W_PAD) * _W_PAD
    pair_kw = _pair_kw(images, g, order)
    # the forward's padded order: 8 columns per window row (C * kh of them)
    KW8 = g.C * g.kh * 8 if pair_kw else K
    PKP = cdiv(KW8, _W_PAD) * _W_PAD
    wk = _new((D, PKP), device=dev, dtype=weight.dtype)[:, :KW8]
    write_plain = plain and order != patch_order
    w_plain = _new((D, KP), device=dev, dtype=weight.dtype)[:, :K] if write_plain else weight if plain else None
    colsum, shift = _new((D,), device=dev, dtype=torch.float32), _new((D,), device=dev, dtype=torch.float32)
    # 8 rows of W per program: D / 8 programs (96 for D 768) where 32 rows left most SMs
    # idle (P2 prep 6.5 -> 4.1 us, estimate); 32 x 64 tiles spilled 24 B for float16
    # weights with triton 3.6 on sm_90a (as launched)
    block_n, block_k = (16, 32) if interpret else (8, 64)
    launch(Launch(
        f"patch_embed_prep[{SHORT[weight.dtype]},{patch_order}->{order},K{K}]",
        _prep_kernel, (cdiv(D, block_n),),
        [weight, in_weight if in_weight is not None else weight,
         in_bias if in_bias is not None else weight, bias if bias is not None else weight,
         wk, colsum, shift, w_plain if write_plain else wk,
         D, K, KP, g.C, g.kh * g.kw, weight.stride(0), weight.stride(1)],
        {"BLOCK_N": block_n, "BLOCK_K": block_k, "SRC_PQC": patch_order == "pqc",
         "DST_PQC": order == "pqc", "HAS_G": in_weight is not None,
         "HAS_B": in_bias is not None, "HAS_BIAS": bias is not None, "WRITE_PLAIN": write_plain,
         "PAIR_KW": pair_kw, "PKP": PKP if pair_kw else 0},
        4, 1,
        reads=(weight, in_weight, in_bias, bias),
        writes=(wk, colsum, shift, w_plain if write_plain else None),
        loops={"k0": cdiv(PKP, block_k)},
    ))  # fmt: skip
    return _Prepared(g, order, wk, colsum, shift, w_plain, True, pair_kw)


def _fwd_launch(
    images, prep: _Prepared, out_weight, out_bias, pos_embed, cls_token, out, stats,
    in_eps, out_eps, has_in_norm, has_out_norm, interpret, y=None, ostats=None, recompute=False,
) -> Launch:
    """stats: the input norm's (M, 2) row statistics to write; y, ostats (with the
    output norm): the pre-norm tokens (M, D) and the output norm's (M, 2) to write;
    recompute: the backward's recompute of the pre-norm tokens (into out)."""
    g, w = prep.g, prep.w
    D, K, M = w.shape[0], g.K, g.B * g.L
    P = 0 if cls_token is None else cls_token.shape[0]
    aligned = all(t is None or t.data_ptr() % 16 == 0 for t in (images, w, out_weight, out_bias, pos_embed, cls_token, out))
    cfg = fwd_config(
        M, D, K, images.dtype, has_in_norm, has_out_norm, interpret, target_arch(images.device), aligned
    )
    thirds = cfg.thirds and not has_out_norm and D == 3 * cfg.block_n
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
        y if y is not None else out, ostats if ostats is not None else f32_dummy,
        M, g.L, g.Wo, D, K, *ints, P,
        *xs, w.stride(0), w.stride(1), pos.stride(0), pos.stride(-1), cls.stride(0), cls.stride(-1),
        out.stride(0), out.stride(1), out.stride(2),
        float(in_eps), float(out_eps),
    ]
    constexprs = {
        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
        **_patch_constexprs(images, g, prep.order, cfg.block_m, cfg.block_k, out),
        "EVEN_N": D % cfg.block_n == 0,
        "WVEC": _run_vec(w, 1, cdiv(w.shape[1], _W_PAD) * _W_PAD if prep.w_pad else K),
        "W_PAD": prep.w_pad,
        "OVEC": min(_run_vec(out, 2, D), _run_vec(pos_embed, 1, D), _run_vec(y, -1, D)),
        "IN_NORM": bool(has_in_norm), "HAS_SHIFT": prep.shift is not None,
        "OUT_NORM": bool(has_out_norm),
        "RCP_ROWS": g.L + cfg.block_m < _RCP_ROWS_LIMIT,
        "FLAT_OUT": P == 0 and out.stride(0) == g.L * out.stride(1),
        "HAS_OW": has_out_norm and out_weight is not None,
        "HAS_OB": has_out_norm and out_bias is not None,
        "HAS_POS": pos_embed is not None,
        "POS_ALL": pos_embed is not None and pos_embed.shape[0] == P + g.L,
        "HAS_CLS": P > 0,
        "WRITE_STATS": stats is not None,
        "SAVE_Y": y is not None,
        "PREC": dot_precision(images.dtype),
        "THIRDS": thirds,
        # the padding mask from per-row and per-k bit words (kernels of at most 15 x 15)
        "HW_BITS": g.mask_hw and g.kh <= 15 and g.kw <= 15,
        # the patches as 4-byte pixel pairs, W' in their padded order (``_gemm_pairs``)
        "PAIR_KW": prep.pair_kw,
    }
    m_blocks = cdiv(M, cfg.block_m)
    grid = (m_blocks,) if has_out_norm or thirds else (m_blocks * cdiv(D, cfg.block_n),)
    parts = (("in", has_in_norm), ("out", has_out_norm), ("pos", pos_embed is not None), ("cls", P > 0))
    tag = "+".join(t for t, on in parts if on) or "plain"
    if recompute:
        tag += ",recompute"
    elif stats is not None or y is not None:
        tag += ",save"
    name = f"patch_embed_fwd[{_tag(images.dtype, g, prep.order, D)},{tag}]"
    return Launch(
        name, _patch_embed_fwd_kernel, grid, args, constexprs, cfg.num_warps, cfg.num_stages,
        reads=(images, w, prep.colsum, prep.shift, out_weight, out_bias, pos_embed, cls_token),
        writes=(out, stats, y, ostats),
        # the column loops (first pass, normalisation, prefix tokens) run over all of D
        # with an output norm, over one tile without; p over the prefix tokens
        loops={"n0": cdiv(D, cfg.block_n) if has_out_norm else 3 if thirds else 1, "k0": w.shape[1] // cfg.block_k,
               "n1": cdiv(D, cfg.block_n) - 1 if has_out_norm else 0, "p": P},
    )  # fmt: skip


# ----------------------------------------------------------------------------
# launchers


_new = alloc  # every result and scratch buffer the launchers allocate (tests poison them)


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
) -> torch.Tensor:
    """Forward launcher (see the module docstring for the contract)."""
    return _forward(
        images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token,
        kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm, has_out_norm, False,
    )[0]


def patch_embed_fwd_saving(
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
) -> tuple[torch.Tensor, ...]:
    """The forward launcher's tokens and what the backward reads: (out, *saved), saved
    as ``saved_layout`` describes it (the arguments as ``patch_embed_fwd``'s)."""
    return _forward(
        images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token,
        kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm, has_out_norm, True,
    )


SavedLayout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype] | None


def saved_layout(
    images: torch.Tensor, weight: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], patch_order: str, has_in_norm: bool, has_out_norm: bool,
) -> tuple[SavedLayout, SavedLayout, SavedLayout, SavedLayout]:
    """(shape, strides, dtype) of what ``patch_embed_fwd_saving`` writes for the backward,
    None where it writes nothing (an empty (0,) tensor in the images' dtype stands there):

      y       (B, L, D) images' dtype: the pre-output-norm tokens (output norm)
      stats   (M, 2) float32: the input norm's (mu, rstd) of each patch (input norm)
      ostats  (M, 2) float32: the output norm's (mean, rstd) of each token (output norm)
      w_plain (D, K) images' dtype, rows KP >= K apart: W in the kernel's patch order
              (input norm, when that order is not patch_order; else W itself serves)
    """
    g = _geometry(images, kernel_size, stride, padding)
    D, K, M = weight.shape[0], g.K, g.B * g.L
    f32 = torch.float32
    y = ((g.B, g.L, D), (g.L * D, D, 1), images.dtype) if has_out_norm else None
    stats = ((M, 2), (2, 1), f32) if has_in_norm else None
    ostats = ((M, 2), (2, 1), f32) if has_out_norm else None
    plain = has_in_norm and _kernel_order(images, patch_order) != patch_order
    w_plain = ((D, K), (cdiv(K, _W_PAD) * _W_PAD, 1), weight.dtype) if plain else None
    return y, stats, ostats, w_plain


def _forward(
    images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token,
    kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm, has_out_norm, save,
) -> tuple[torch.Tensor, ...]:
    """(out,) or, with save, (out, y, stats, ostats, w_plain) (``saved_layout``)."""
    _check_launch(images)
    interpret = triton_interpret() and images.device.type == "cpu"
    prep = _prepare(
        images, weight, bias, in_weight, in_bias, kernel_size, stride, padding, patch_order,
        has_in_norm, interpret, plain=save and has_in_norm,
    )
    g = prep.g
    P = 0 if cls_token is None else cls_token.shape[0]
    dev = images.device
    out = _new((g.B, P + g.L, weight.shape[0]), device=dev, dtype=images.dtype)
    y = stats = ostats = None
    saved: tuple[torch.Tensor, ...] = ()
    if save:
        layout = saved_layout(
            images, weight, kernel_size, stride, padding, patch_order, has_in_norm, has_out_norm
        )
        y, stats, ostats = (
            None if spec is None else _new(spec[0], device=dev, dtype=spec[2]) for spec in layout[:3]
        )
        w_plain = prep.w_plain if layout[3] is not None else None
        saved = tuple(images.new_empty((0,)) if t is None else t for t in (y, stats, ostats, w_plain))
    if g.B > 0:
        launch(
            _fwd_launch(
                images, prep, out_weight, out_bias, pos_embed, cls_token, out, stats,
                in_eps, out_eps, has_in_norm, has_out_norm, interpret, y, ostats,
            )
        )
    return (out, *saved)


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
    saved: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, ...]:
    """Backward launcher (see the module docstring for the contract); saved: what
    ``patch_embed_fwd_saving`` wrote, (y, stats, ostats, w_plain), empty (0,) tensors
    (or none at all: the forward launcher's contract) where the forward saved nothing:
    the backward recomputes them then."""
    _check_launch(images)
    y_s, stats_s, ostats_s, wplain_s = (t if t.numel() > 0 else None for t in saved) if saved else (None,) * 4
    from_saved = (not has_in_norm or stats_s is not None) and (
        not has_out_norm or (y_s is not None and ostats_s is not None)
    )
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
    if M == 0:
        for i in range(6):
            if want[i]:
                res[i] = torch.zeros_like(params[i])
    interpret = triton_interpret() and dev.type == "cpu"
    cfg = bwd_config(max(M, 1), D, K, dtype, interpret, sm_count(dev), order == "pqc" and has_in_norm)
    ints, xs = _x_args(images, g)
    pc = _patch_constexprs(images, g, order, cfg.block_m, cfg.block_k, grad_out)
    # the dW and dXn loops' patch rows from float reciprocals (``_patch_rows``)
    rcp_rows = g.L + cfg.block_m < _RCP_ROWS_LIMIT
    norms = "+".join(n for n, on in (("in", has_in_norm), ("out", has_out_norm)) if on) or "plain"
    tag = f"{_tag(dtype, g, order, D)},{norms}"
    reorder = order != patch_order

    def run(name, kernel, grid, args, reads, writes, loops, **constexprs) -> None:
        launch(Launch(f"{name}[{tag}]", kernel, grid, args, constexprs, cfg.num_warps, cfg.num_stages,
                      reads=reads, writes=writes, loops=loops))  # fmt: skip

    m_blocks = cdiv(M, cfg.block_m)
    kernels = M > 0 and any(want[:6])
    # the bias gradient: the output norm's partials, else dW's extra tile that sums dy
    # (dW runs for it even when the weight is frozen); the row splits of dW and dxn
    bias_col = kernels and want[1] and not has_out_norm
    dw_launch = kernels and (want[0] or bias_col)
    num_k_dw = cdiv(K, cfg.block_k) + bias_col
    dw_split = cfg.split
    if bias_col and not interpret:  # whole waves counting the bias tiles
        dw_split = _row_split(cdiv(D, cfg.block_n) * num_k_dw, m_blocks, sm_count(dev))
    dw_per = cdiv(m_blocks, dw_split)
    dw_split = cdiv(m_blocks, dw_per)
    dxn_launch = kernels and (want[2] or want[3])
    num_k = cdiv(K, cfg.block_k)
    dxn_split = cfg.split if interpret else _row_split(num_k, m_blocks, sm_count(dev))
    # dW, the bias and dxn in one pass when every column fits one tile (T2T's D 192);
    # not on sm_80, whose mma.sync keeps both GEMMs' operands in registers (it spilled
    # 24 B with 64 x 256 x 32 tiles)
    fused_n = triton.next_power_of_2(D)
    # nor for float32 on a GPU, whose FMA dots spilled 0.7-18 KB there at P3 (sm_90a, any
    # tile tried; the interpreter's float32 tests run it, in the 16-bit inputs' stead)
    fused = dxn_launch and fused_n <= _FUSED_MAX_N and target_arch(dev) >= 90 and (dtype != torch.float32 or interpret)
    # nor where dy's 16-bit rows cannot be copied asynchronously (``_dy_rows_async``)
    fused = fused and _dy_rows_async(grad_out, bool(kernels and has_out_norm), D)
    num_k_fused = cdiv(K + bias_col, cfg.block_k)
    # its row blocks and the stats kernel's: (block_m // tw) x tw tiles of the patch grid
    tw = min(_TILE_W, triton.next_power_of_2(g.Wo), cfg.block_m)
    tiles_h, tiles_w = cdiv(g.Ho, cfg.block_m // tw), cdiv(g.Wo, tw)
    grid_tiles = g.B * tiles_h * tiles_w
    tiles_even = g.Ho % (cfg.block_m // tw) == 0 and g.Wo % tw == 0  # every tile inside the grid
    if fused:
        dw_launch = False
        dw_split = (
            min(cfg.split, grid_tiles) if interpret else _row_split(num_k_fused, grid_tiles, sm_count(dev), _FUSED_PER_SM)
        )
        dw_per = cdiv(grid_tiles, dw_split)
        dxn_split = dw_split = cdiv(grid_tiles, dw_per)  # the partials the fold sums
    if not fused:
        dxn_per = cdiv(m_blocks, dxn_split)
        dxn_split = cdiv(m_blocks, dxn_per)

    # one float32 workspace holds every partial sum the fold kernel adds up
    sizes = {
        "dw": dw_split * D * K if dw_launch or (fused and want[0]) else 0,
        "bias": dw_split * D if bias_col else 0,
        "out": 3 * m_blocks * D if kernels and has_out_norm else 0,
        "dxn": 2 * dxn_split * K if dxn_launch else 0,
    }
    offs, total = {}, 0
    for key, n in sizes.items():
        offs[key] = total
        total += -(-n // 16) * 16  # 64-byte aligned regions
    ws_all = _new((max(total, 1),), device=dev, dtype=torch.float32)

    def region(key: str, *shape: int) -> torch.Tensor:
        return ws_all[offs[key] : offs[key] + sizes[key]].view(*shape)

    # the input norm's affine stays in the caller's patch order (dW indexes it so)
    gin = in_weight if has_in_norm else None
    bin_ = in_bias if has_in_norm else None
    stats = None
    if has_in_norm and kernels:
        stats = stats_s if from_saved else _new((M, 2), device=dev, dtype=torch.float32)

    # dy = d loss / d(patches @ W.T + bias): rows at b * sdb + (P + l) * sdt
    dy_t, dyP, (sdb, sdt, sdd) = grad_out, P, grad_out.stride()
    # W in kernel order for dxn: the saving forward's, or the recompute's prep launch's
    w_k = wplain_s if from_saved else None
    if kernels and has_out_norm:
        y, ostats = y_s, ostats_s  # the pre-norm tokens and the norm's (mean, rstd)
        if not from_saved:  # recomputed in float32 (the statistics then from y)
            prep = _prepare(
                images, weight, bias, in_weight, in_bias, kernel_size, stride, padding, patch_order,
                has_in_norm, interpret, plain=dxn_launch,
            )
            w_k = prep.w_plain
            y, ostats = _new((g.B, g.L, D), device=dev, dtype=torch.float32), None
            launch(
                _fwd_launch(
                    images, prep, None, None, None, None, y, stats,
                    in_eps, out_eps, has_in_norm, False, interpret, recompute=True,
                )
            )
        dy = _new((M, D), device=dev, dtype=dtype)
        parts = region("out", 3, m_blocks, D)
        run(
            "patch_embed_out_norm_bwd", _out_norm_bwd_kernel, (m_blocks,),
            [grad_out, y, ostats if ostats is not None else y, out_weight if out_weight is not None else y, dy,
             parts[0], parts[1], parts[2], M, g.L, D, P, *grad_out.stride(), float(out_eps)],
            (grad_out, y, ostats, out_weight), (dy, parts), {"n0": cdiv(D, cfg.block_n)},
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_OW=out_weight is not None,
            IDX64=pc["IDX64"], GVEC=_run_vec(grad_out, 2, D),
            YVEC=min(_run_vec(y, 2, D), _run_vec(dy, 1, D)), HAS_OSTATS=ostats is not None,
        )
        dy_t, dyP, (sdb, sdt, sdd) = dy, 0, (g.L * D, D, 1)
    elif kernels and has_in_norm and not from_saved:
        run(
            "patch_embed_stats", _patch_stats_kernel, (grid_tiles,),
            [images, stats, g.L, g.Ho, g.Wo, K, *ints, *xs, tiles_h, tiles_w, float(in_eps)],
            (images,), (stats,), {"k0": cdiv(K, cfg.block_k)},
            BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, TW=tw, **{**pc, "EVEN_M": tiles_even},
        )
    dvec = _run_vec(dy_t, -1, D)

    if dw_launch:
        ws = region("dw", dw_split, D, K)
        bias_part = region("bias", dw_split, D) if bias_col else ws
        run(
            "patch_embed_dw", _dw_kernel,
            (cdiv(D, cfg.block_n) * num_k_dw, dw_split),
            [images, dy_t, stats if stats is not None else images,
             gin if gin is not None else images, bin_ if bin_ is not None else images, ws, bias_part,
             M, g.L, g.Wo, D, K, *ints, dyP, *xs, sdb, sdt, sdd, dw_per],
            (images, dy_t, stats, gin, bin_), (ws, bias_part if bias_col else None),
            # the bias tile's loop (mbb, quarter row blocks) in one program of num_k_dw,
            # the GEMM's (mb) in the others
            {"mb": m_blocks / dw_split * (num_k_dw - bias_col) / num_k_dw,
             "mbb": 4 * m_blocks / dw_split * bias_col / num_k_dw},
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **pc, DVEC=dvec,
            IN_NORM=bool(has_in_norm), HAS_GIN=gin is not None, HAS_BIN=bin_ is not None,
            PREC=dot_precision(dtype), REORDER=reorder, BIAS=bias_col, RCP_ROWS=rcp_rows,
        )
    if fused:
        if w_k is None:
            w_k = _reorder(weight, g, patch_order, order)
        ws = region("dw", dw_split, D, K) if want[0] else w_k
        bias_part = region("bias", dw_split, D) if bias_col else w_k
        dparts = region("dxn", 2, dxn_split, K)
        run(
            "patch_embed_dw_dxn", _dw_dxn_kernel, (num_k_fused, dw_split),
            [images, dy_t, w_k, stats, gin if gin is not None else images,
             bin_ if bin_ is not None else images, ws, bias_part, dparts[0], dparts[1],
             g.L, g.Ho, g.Wo, D, K, *ints, dyP, *xs, sdb, sdt, sdd, w_k.stride(0), w_k.stride(1),
             tiles_h, tiles_w, grid_tiles, dw_per],
            (images, dy_t, w_k, stats, gin, bin_),
            (ws if want[0] else None, bias_part if bias_col else None, dparts),
            {"mb": grid_tiles / dw_split},
            BLOCK_M=cfg.block_m, BLOCK_N=fused_n, BLOCK_K=cfg.block_k, TW=tw,
            # the bias column may need a k tile past K's last
            **{**pc, "EVEN_M": tiles_even, "EVEN_K": pc["EVEN_K"] and not bias_col},
            DVEC=dvec,
            WVEC=_run_vec(w_k, 1, K), HAS_GIN=gin is not None, HAS_BIN=bin_ is not None,
            PREC=dot_precision(dtype), REORDER=reorder, DW=want[0], BIAS=bias_col, DXN=True,
        )
    elif dxn_launch:
        if w_k is None:
            w_k = _reorder(weight, g, patch_order, order)
        dparts = region("dxn", 2, dxn_split, K)
        run(
            "patch_embed_dxn", _dxn_kernel, (num_k, dxn_split),
            [images, dy_t, w_k, stats, dparts[0], dparts[1],
             M, g.L, g.Wo, D, K, *ints, dyP, *xs, sdb, sdt, sdd, w_k.stride(0), w_k.stride(1),
             dxn_per],
            (images, dy_t, w_k, stats), (dparts,),
            {"mb": m_blocks / dxn_split, "n0": cdiv(D, cfg.block_n)},
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **pc, DVEC=dvec,
            WVEC=_run_vec(w_k, 1, K), PREC=dot_precision(dtype), REORDER=reorder, RCP_ROWS=rcp_rows,
        )

    # the fold: result i from (workspace offset, partials per element) or grad_out
    src: dict[int, tuple[int, int]] = {}
    if kernels:
        if want[0]:
            src[0] = (offs["dw"], dw_split)
        if want[1]:
            src[1] = (offs["bias"], dw_split) if bias_col else (offs["out"] + 2 * m_blocks * D, m_blocks)
        for i in (2, 3):
            if want[i]:
                src[i] = (offs["dxn"] + (i - 2) * dxn_split * K, dxn_split)
        for i in (4, 5):
            if want[i]:
                src[i] = (offs["out"] + (i - 4) * m_blocks * D, m_blocks)
    for i in src:
        res[i] = _new(tuple(params[i].shape), device=dev, dtype=params[i].dtype)
    T6 = 0
    if want[6]:
        res[6] = _new(tuple(pos_embed.shape), device=dev, dtype=pos_embed.dtype)
        T6 = 0 if pos_embed.shape[0] == P + g.L else P
    if want[7]:
        res[7] = _new(tuple(cls_token.shape), device=dev, dtype=cls_token.dtype)
    folded = [i for i in range(8) if i in src or (i >= 6 and want[i])]
    if not folded:
        return tuple(res)
    n = [res[i].numel() if i in folded else 0 for i in range(8)]
    o = [src[i][0] if i in src else 0 for i in range(6)]
    r = [src[i][1] if i in src else 0 for i in range(6)]
    # the interpreter: 128 (several blocks per result at test shapes), up to 8192 so that
    # large results (a K = 11907 weight) take tens of programs, not thousands
    block = min(8192, max(128, triton.next_power_of_2(cdiv(sum(n), 32)))) if interpret else 1024
    dummy = res[folded[0]]
    launch(Launch(
        f"patch_embed_fold[{tag}]", _fold_kernel, (sum(cdiv(v, block) for v in n),),
        [ws_all, grad_out, *(res[i] if i in folded else dummy for i in range(8)), *n, *o, *r,
         g.B, D, T6, *grad_out.stride()],
        {"BLOCK": block, "GVEC": _run_vec(grad_out, 2, D), "IDX64": _needs_idx64(grad_out, ws_all)},
        4, 1,
        reads=(ws_all if src else None, grad_out if n[6] or n[7] else None),
        writes=[res[i] for i in folded],
        loops=_fold_loops(n, r, g.B, block),
    ))  # fmt: skip
    return tuple(res)


def _fold_loops(n: Sequence[int], r: Sequence[int], B: int, block: int) -> dict[str, float]:
    """Mean trip counts per program of the fold kernel's two loops."""
    blocks = [cdiv(v, block) for v in n]
    programs = max(1, sum(blocks))
    return {
        "s": sum(b * k for b, k in zip(blocks[:6], r, strict=True)) / programs,
        "b": (blocks[6] + blocks[7]) * B / programs,
    }


# ----------------------------------------------------------------------------
# the launches of one workload shape (ahead-of-time compiles, the estimate)


def record_calls(
    shape: PatchEmbedShape, batch: int, dtype: torch.dtype, direction: str, tensor: TensorFactory
) -> None:
    """Call the launcher of one direction as the op calls it, every gradient wanted in
    the backward; images contiguous, channels-last or a view of (B, N, C) tokens
    (``shape.layout``), inputs made by ``tensor``. Directions: "fwd" (inference: no
    gradient needed), "fwd_saving" (the forward of a training step, writing what the
    backward reads), "bwd" (the backward after it), "bwd_recompute" (the backward after
    a forward that saved nothing)."""
    s, B = shape, batch
    C, side, D, K = s.channels, s.image, s.dim, s.k
    if s.layout == "tokens":
        images = tensor((B, side * side, C), dtype).transpose(1, 2).unflatten(2, (side, side))
    elif s.layout == "channels_last":
        images = tensor((B, side, side, C), dtype).permute(0, 3, 1, 2)
    else:
        images = tensor((B, C, side, side), dtype)

    def vec(*size: int) -> torch.Tensor:
        return tensor(size, dtype)

    args = (
        images, vec(D, K), vec(D), vec(K) if s.in_norm else None, vec(K) if s.in_norm else None,
        vec(D) if s.out_norm else None, vec(D) if s.out_norm else None,
        vec(s.pos_rows, D) if s.pos_rows else None, vec(s.prefix, D) if s.prefix else None,
        [s.kernel] * 2, [s.stride] * 2, [s.padding] * 2, s.patch_order, 1e-5, 1e-5, s.in_norm, s.out_norm,
    )  # fmt: skip
    if direction == "fwd":
        patch_embed_fwd(*args)
    elif direction == "fwd_saving":
        patch_embed_fwd_saving(*args)
    elif direction in ("bwd", "bwd_recompute"):

        def like(spec: SavedLayout) -> torch.Tensor:
            if spec is None:
                return images.new_empty((0,))
            size, strides, dt = spec
            if len(size) == 2 and strides[0] != size[1]:  # w_plain's rows padded
                return tensor((size[0], strides[0]), dt)[:, : size[1]]
            return tensor(size, dt)

        saved = ()
        if direction == "bwd":
            saved = tuple(map(like, saved_layout(images, args[1], *args[9:13], s.in_norm, s.out_norm)))
        patch_embed_bwd(vec(B, s.prefix + s.tokens, D), *args, [True] * 8, saved)
    else:
        raise ValueError(
            f"patch_embed record_calls: direction {direction!r}; expected 'fwd', 'fwd_saving', 'bwd' or "
            "'bwd_recompute'"
        )
